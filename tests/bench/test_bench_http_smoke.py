"""`python -m bench.bench_http` end to end on the CPU: it writes a tiny checkpoint, starts the real server,
drives it over HTTP (and WebSocket, where the server has the route) and writes its JSON and docs section."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bench import bench_http
from bench.bench_http import (
    BYTES_PER_S,
    DOCS_END,
    DOCS_START,
    Bench,
    Budget,
    Run,
    Sample,
    outside,
    parse_args,
    run_loop,
    step_profile,
    summarize,
    update_docs,
)

REPO = Path(__file__).resolve().parents[2]


def test_worst_gap_is_how_long_a_real_time_player_starves() -> None:
    s = Sample("stream", started=0.0)
    s.add(1.0, 48000)  # 1 s of audio at t=1: plays until t=2
    s.add(1.5, 48000)  # early: plays until t=3
    s.add(3.25, 24000)  # 0.25 s late
    assert s.first == 1.0 and s.bytes == 120000
    assert abs(s.worst_gap_s - 0.25) < 1e-9
    on_time = Sample("stream", started=0.0)
    on_time.add(0.1, 9600)
    on_time.add(0.2, 9600)
    assert on_time.worst_gap_s == 0.0


def test_a_warm_up_burst_at_a_new_concurrency_needs_only_a_few_requests_time() -> None:
    """Before the first burst of 64 only the one-client rate is known: planning that burst at it would skip it
    (and with it every c64 run) whenever less than 64 requests' time is left. Once a rate at 64 is seen, the
    plan uses it."""
    bench = Bench(parse_args(["--frames", "100"]), api=None, report=None, budget=Budget(100.0))  # type: ignore[arg-type]
    bench.request_s = 0.63  # one 8 s request: 12.7x real time
    bench.rate[("stream", 1)] = 12.7
    assert bench.estimate_s("stream", 64, 64) == pytest.approx(512 / 12.7 * 1.3 + 3)  # 55 s: 64 requests at c1
    assert bench.warm_up_estimate_s("stream", 64) == pytest.approx(3 * 0.63 + 5)
    bench.rate[("stream", 64)] = 280.0
    assert bench.warm_up_estimate_s("stream", 64) == pytest.approx(512 / 280 * 1.3 + 3)


def test_docs_section_is_added_under_the_title_then_replaced(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nOlder text.\n")
    data = {
        "card": "cpu-x86_64",
        "date": "2026-12-03",
        "commit": "abc1234",
        "command": "python -m bench.bench_http",
        "versions": {"torch": "2.9.1"},
        "settings": {"model": "m", "size": "tiny", "frames": 6, "audio_s_per_request": 0.48, "text_chars": 10},
        "server": {},
        "api": {},
        "metrics": {},
        "sections": {},
        "targets": [],
    }
    update_docs(docs, data)
    first = docs.read_text()
    assert first.startswith("# Benchmarks\n") and first.index(DOCS_START) < first.index("Older text.")
    assert "| cpu-x86_64 | 2026-12-03 | abc1234 |" in first
    data["commit"] = "def5678"
    update_docs(docs, data)
    second = docs.read_text()
    assert second.count(DOCS_START) == 1 and second.count(DOCS_END) == 1
    assert "def5678" in second and "abc1234" not in second and "Older text." in second


@pytest.mark.slow
def test_http_bench_against_the_real_server_on_a_tiny_checkpoint(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    command = [sys.executable, "-m", "bench.bench_http", "--size", "tiny", "--models-dir", str(tmp_path / "models")]
    command += ["--device", "cpu", "--concurrency", "2", "--frames", "6", "--single-requests", "2"]
    command += ["--loop-rounds", "2", "--warmup-rounds", "1", "--max-seconds", "150", "--targets"]
    command += ["--out", str(tmp_path / "results"), "--docs", str(docs), "--engine-c64", "1.0", "--peers-s", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "| HTTP stream single |" in done.stdout and "| target |" in done.stdout

    (json_path,) = (tmp_path / "results").glob("*-http.json")
    report = json.loads(json_path.read_text())
    assert report["card"].startswith("cpu") and report["command"] and report["commit"]
    assert report["versions"]["torch"] and report["settings"]["frames"] == 6
    assert not report["errors"], report["errors"]
    m = report["metrics"]
    expected = {"http_ttfa_ms_single", "http_xrt_single", "http_latency_ms_single", "http_xrt_single_nonstream"}
    expected |= {"warmup_s", "load_s", "ws_ttfa_ms_p50_c2", "ws_ttfa_ms_p95_c2", "ws_audio_s_per_s_c2"}
    for key in ("http_ttfa_ms_p50", "http_ttfa_ms_p95", "http_audio_s_per_s", "http_worst_gap_ms"):
        expected.add(f"{key}_c2")
    expected |= {"http_starved_streams_c2", "http_latency_ms_p50_c2", "http_latency_ms_p95_c2"}
    expected.add("http_audio_s_per_s_c2_nonstream")
    assert expected <= set(m), expected - set(m)
    http = [k for k in expected if k.startswith("http_") and "starved" not in k and "gap" not in k]
    for key in [*http, "warmup_s", "load_s"]:
        assert m[key] is not None and m[key] > 0, (key, m[key])
    assert m["http_worst_gap_ms_c2"] >= 0 and m["http_starved_streams_c2"] >= 0

    sections = report["sections"]
    for name in ("stream_single", "whole_single", "stream_loop_c2", "stream_burst_c2", "whole_loop_c2"):
        s = sections[name]
        assert s["ok"] == s["requests"] > 0 and s["exact_lengths"], (name, s)
        assert 0 < s["ttfa_ms_p50"] <= s["latency_ms_p50"], (name, s)
    assert sections["stream_single"]["audio_s_expected"] == pytest.approx(0.48)
    # The server's own account of each finished request (its /metrics phases) fits inside the client's latency.
    for name in ("stream_single", "whole_single"):
        s = sections[name]
        profile = s["step_profile"]
        assert profile["requests"] == s["requests"], (name, profile)
        assert 0 < sum(profile["ms_per_request"].values()) <= s["latency_ms_p95"], (name, profile, s)
        # What the engine's phases leave of the client's mean latency: HTTP and the checks, never negative.
        assert 0 <= outside(s) < s["latency_ms_mean"], (name, profile, s)
        # The server's event-loop probe woke during the run (a wake-up may be on time: its lateness may be 0).
        assert profile["loop_probes"] > 0 and profile["loop_lag_ms_mean"] is not None, profile
        assert isinstance(profile["loop_lags_over_50ms"], int), profile
    # The first audio byte of a stream comes before its end (when the server streams that route).
    if report["api"]["streamed"]:
        assert sections["stream_single"]["ttfa_ms_median"] < sections["stream_single"]["latency_ms_median"]
    if report["api"].get("ws_available"):
        assert m["ws_ttfa_ms_p95_c2"] > 0 and m["ws_audio_s_per_s_c2"] > 0
    else:
        assert any(s.startswith("ws:") for s in report["skipped"])
    assert [t["status"] for t in report["targets"]][-1] in ("met", "missed")
    # The peers ran after the server, in the same command: on the CPU only upstream (the peer needs CUDA).
    reference = report["peers"]["engines"]["reference"]
    assert reference["model"] == "tiny-CustomVoice" and reference["concurrency"] == 2
    assert reference["xrt_single"] > 0 and reference["audio_s_per_s"] > 0, reference
    peer_target = next(t for t in report["targets"] if "faster-qwen3-tts" in t["target"])
    assert peer_target["value"] == "reference" and peer_target["status"] == "missed"

    text = docs.read_text()
    assert DOCS_START in text and DOCS_END in text and report["commit"] in text
    assert "| reference | tiny-CustomVoice |" in text
    assert "| run | requests | prompt | queue | first_frame | frames | tail | outside |" in text


def test_a_request_short_of_its_frames_that_did_not_end_at_eos_counts_as_lost_audio() -> None:
    """Random weights run every request to its frame limit: a shorter one lost audio (the codec thread dropped a
    chunk of 12 frames, 2026-12-03 to 12-06), unless it says it ended at EOS."""

    def sample(seconds: float, reason: str | None = None) -> Sample:
        s = Sample("whole", started=0.0, finished=1.0, finish_reason=reason)
        s.add(1.0, int(seconds * BYTES_PER_S))
        return s

    run = Run([sample(8.0), sample(7.04), sample(7.04, "eos")], 0.0, 1.0, 3, "burst", False)
    summary = summarize(run, frames=100, starve_s=0.0)
    assert summary["short_requests"] == 1 and summary["audio_s_per_request_min"] == 7.04


def test_outside_is_the_clients_mean_latency_less_the_phases_of_the_same_requests() -> None:
    profile = {"requests": 4, "ms_per_request": {"prompt": 5.0, "queue": 40.0, "frames": 800.0, "tail": 25.0}}
    section = {"ok": 4, "latency_ms_mean": 1000.0, "step_profile": profile}
    assert outside(section) == 130.0
    # The engine finished other requests than the client's (WebSocket segments, a request cut off): no figure.
    assert outside({**section, "ok": 3}) is None and outside({**section, "latency_ms_mean": None}) is None


def test_the_step_profile_gives_the_codecs_mean_batch_apart_from_the_steps_milliseconds() -> None:
    before = {"steps": 10.0, "codec": 0.5, "codec_batches": 4.0, "codec_streams": 10.0, "codec_rows": 16.0}
    after = {"steps": 110.0, "codec": 1.5, "codec_batches": 24.0, "codec_streams": 130.0, "codec_rows": 176.0}
    profile = step_profile(before, after)
    assert profile["ms_per_step"] == {"codec": 10.0}
    assert profile["codec_batches"] == 20 and profile["codec_streams_per_batch"] == 6.0
    assert profile["codec_rows_per_batch"] == 8.0
    assert step_profile({"steps": 1.0}, {"steps": 2.0})["codec_streams_per_batch"] is None  # no codec batch


def test_a_loops_steady_window_counters_are_read_at_its_first_end_and_its_last_start(monkeypatch) -> None:
    """Three clients of three requests, the third 0.25 s late: the server's counters are read once the
    first request has ended and once every client has started its last one, so the step profile of the two
    counts the steps between (the counter here is the time in ms; 50 ms of slack for a loaded machine, where
    the wrong moments are 250 ms off or more)."""
    t0 = time.monotonic
    events: list[tuple[str, float]] = []

    async def client(api: object, seed: int) -> Sample:
        sample = Sample("stream", started=t0())
        events.append(("start", sample.started))
        await asyncio.sleep(0.1)
        sample.finished = t0()
        sample.add(sample.finished, 2)  # some audio: an ok sample
        events.append(("end", sample.finished))
        return sample

    async def counters() -> dict[str, float]:
        return {"steps": round(t0() * 1000), "batch_size_sum": 0.0, "batch_size_count": 0.0}

    monkeypatch.setitem(bench_http.CLIENTS, "stream", client)
    api = types.SimpleNamespace(next_seed=lambda: 0)
    run = asyncio.run(run_loop(api, "stream", 3, 3, 60.0, 10.0, stagger_s=0.125, counters=counters))
    assert len(run.samples) == 9 and run.window_counters is not None
    first_end = min(t for kind, t in events if kind == "end")
    last_start = max(t for kind, t in events if kind == "start")
    at_end, at_start = run.window_counters
    assert at_end["steps"] == pytest.approx(first_end * 1000, abs=50)
    assert at_start["steps"] == pytest.approx(last_start * 1000, abs=50)
    assert step_profile(at_end, at_start)["steps"] == pytest.approx((last_start - first_end) * 1000, abs=100)
    # One round has no steady window; without counters nothing is read.
    assert asyncio.run(run_loop(api, "stream", 2, 1, 60.0, 10.0, counters=counters)).window_counters is None
    assert asyncio.run(run_loop(api, "stream", 2, 2, 60.0, 10.0)).window_counters is None

    async def cut_short() -> tuple[Run, int]:  # 30 rounds of 0.1 s, stopped after 1 s: no window, nothing left
        run = await run_loop(api, "stream", 2, 30, 60.0, 1.0, counters=counters)
        return run, len(asyncio.all_tasks()) - 1

    run, pending = asyncio.run(cut_short())
    assert run.cut_short and run.window_counters is None and pending == 0
