"""The event loop's lateness in /metrics: a probe on the serving loop sees what holds it."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from qwen_tts_server.api.loop_lag import watch_event_loop


def lag_samples(text: str) -> dict[str, float]:
    """`_count`, `_sum` and the count at or under 0.25 s of qtts_event_loop_lag_seconds."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name != "qtts_event_loop_lag_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels["le"] == "0.25":
                out["le_0.25"] = sample.value
            elif not sample.name.endswith("_bucket"):
                out[sample.name.rsplit("_", 1)[1]] = sample.value
    return out


def test_the_server_counts_how_long_its_event_loop_was_held(client):
    """A handler that blocks the serving loop for 0.4 s (the mistake this metric is there to show) appears as a
    probe woken over 0.25 s late, by the probe that has run on the serving loop since start."""

    @client.app.get("/test-block-the-loop")
    async def block() -> dict:
        time.sleep(0.4)  # on the loop: nothing else runs meanwhile
        return {"blocked": True}

    deadline = time.monotonic() + 10
    while (before := lag_samples(client.get("/metrics").text)).get("count", 0) < 3:
        assert time.monotonic() < deadline, "the probe did not run"
        time.sleep(0.05)
    assert client.get("/test-block-the-loop").json() == {"blocked": True}
    time.sleep(0.1)  # the probe wakes after the handler returns
    after = lag_samples(client.get("/metrics").text)
    assert (after["count"] - after["le_0.25"]) - (before["count"] - before["le_0.25"]) >= 1, (before, after)
    assert after["sum"] - before["sum"] >= 0.3, (before, after)


def test_the_probe_records_each_wake_ups_lateness(no_collector):
    """A loop held 0.2 s shows as a wake-up over 0.1 s late and 0.2 s of lateness; the garbage collector is
    off meanwhile (a full collection of a test session's objects can itself hold the loop 0.3 s)."""
    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "test", buckets=(0.01, 0.1, 1.0), registry=registry)

    async def main() -> None:
        probe = asyncio.create_task(watch_event_loop(lag, interval_s=0.005))
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # holds the loop
        await asyncio.sleep(0.05)
        probe.cancel()

    asyncio.run(main())
    count = registry.get_sample_value("lag_seconds_count")
    late = count - registry.get_sample_value("lag_seconds_bucket", {"le": "0.1"})
    assert count >= 5 and late >= 1, (count, late)
    assert registry.get_sample_value("lag_seconds_sum") >= 0.19


def test_under_uvloop_the_probe_reads_lateness_finer_than_a_millisecond():
    """uvicorn runs on uvloop, whose `loop.time()` is libuv's millisecond clock, cached an iteration: read from
    it, every lateness would be 0 or a whole millisecond. The probe's own clock sees the fractions between."""
    uvloop = pytest.importorskip("uvloop")
    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "test", buckets=(1e-6, 0.0009, 1.0), registry=registry)

    async def main() -> None:
        probe = asyncio.create_task(watch_event_loop(lag, interval_s=0.005))
        await asyncio.sleep(0.3)
        probe.cancel()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    under_1us = registry.get_sample_value("lag_seconds_bucket", {"le": "1e-06"})
    fractions = registry.get_sample_value("lag_seconds_bucket", {"le": "0.0009"}) - under_1us
    assert registry.get_sample_value("lag_seconds_count") >= 20 and fractions >= 1, (under_1us, fractions)
