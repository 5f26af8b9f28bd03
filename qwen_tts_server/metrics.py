"""Prometheus metrics, in a registry of their own per app (tests build many apps)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from .collector import PAUSES
from .storage.database import OUTAGE_RETRIES

# One fast engine's counters: (model, device, steps, seconds per part of its loop, its finished requests: how
# many, and their seconds summed per phase, see engine.fast.timing.RequestPhases, and its streaming codec's
# batches, streams and rows, see FastEngine.codec_batches).
EngineReport = tuple[str, str, int, dict[str, float], tuple[int, dict[str, float]], dict[str, int]]
CODEC_COUNTS = {
    "batches": "Fast engine: streaming-codec batches run (a captured graph's replay or an eager batch)",
    "streams": "Fast engine: streams' chunks decoded in those batches (per batch: this over batches)",
    "rows": "Fast engine: rows those batches computed, a captured graph's padding rows included",
}


class EngineCollector(Collector):
    """The fast engines' step counts, loop seconds per part and finished requests' phases, read from the
    engines at scrape time (they count on their own threads; nothing is pushed per step)."""

    def __init__(self) -> None:
        self.sources: list[weakref.WeakMethod[Callable[[], list[EngineReport]]]] = []  # engines' report methods

    def collect(self) -> Iterator[Metric]:
        steps = CounterMetricFamily(
            "qtts_engine_steps", "Fast-engine steps (one frame for every running request)", labels=["model", "device"]
        )
        seconds = CounterMetricFamily(
            "qtts_engine_seconds",
            "Fast-engine loop seconds by part: the step thread's host time (admit, prefill, launch, gpu_wait, "
            "deliver), the frames' GPU time (gpu_frame), the codec thread's host time (codec)",
            labels=["model", "device", "part"],
        )
        phases = SummaryMetricFamily(
            "qtts_engine_request_phase_seconds",
            "Fast engine: where finished requests' time went, prompt to finish: prompt (building it, to submit), "
            "queue (to admission), first_frame "
            "(admission to first frame), frames (first to last frame), tail (last frame to its last audio out)",
            labels=["model", "device", "phase"],
        )
        codec = {
            key: CounterMetricFamily(f"qtts_engine_codec_{key}", text, labels=["model", "device"])
            for key, text in CODEC_COUNTS.items()
        }
        for ref in self.sources:
            source = ref()
            if source is None:  # that engine is gone
                continue
            for model, device, count, parts, (requests, phase_seconds), codec_counts in source():
                steps.add_metric([model, device], count)
                for part, value in parts.items():
                    seconds.add_metric([model, device, part], value)
                for phase, value in phase_seconds.items():
                    phases.add_metric([model, device, phase], count_value=requests, sum_value=value)
                for key, value in codec_counts.items():
                    codec[key].add_metric([model, device], value)
        yield steps
        yield seconds
        yield phases
        yield from codec.values()


class OutageCollector(Collector):
    """Background work's waits for an outage to pass (`storage.database.OUTAGE_RETRIES`, process-wide): a job
    item whose audio meets a full disk keeps it and tries again, and this is where an operator sees that."""

    def collect(self) -> Iterator[Metric]:
        retries = CounterMetricFamily(
            "qtts_outage_retries",
            "Tries of background work (job items' audio and results, webhooks, the job runner) put off by an "
            "outage: a disk full (disk_full) or the database down or busy (database_unavailable)",
            labels=["reason"],
        )
        for reason, count in dict(OUTAGE_RETRIES.counts).items():
            retries.add_metric([reason], count)
        yield retries


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "qtts_requests_total", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "qtts_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.items = Counter("qtts_items_total", "Utterances generated", ["model", "mode"], registry=r)
        self.audio_seconds = Counter(
            "qtts_audio_seconds_total", "Seconds of audio generated", ["model", "mode"], registry=r
        )
        self.queue_depth = Gauge("qtts_queue_depth", "Items waiting for or in a GPU batch", registry=r)
        self.batch_size = Histogram(
            "qtts_batch_size", "Items per GPU batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.model_loads = Counter("qtts_model_loads_total", "Model loads", ["model", "result"], registry=r)
        self.model_load_seconds = Histogram(
            "qtts_model_load_seconds", "Time to resolve and load a model", ["model"], registry=r
        )
        self.voice_cache = Counter("qtts_voice_prompt_cache_total", "Voice prompt lookups", ["result"], registry=r)
        self.finished = Counter(
            "qtts_finished_total", "Utterances by how they ended: eos, length, cancelled", ["reason"], registry=r
        )
        self.rejected = Counter("qtts_rejected_total", "Requests refused with 429 (model at capacity)", registry=r)
        self.disconnects = Counter(
            "qtts_client_disconnects_total", "Requests whose client left before the end (work cancelled)", registry=r
        )
        self.deadlines = Counter("qtts_deadline_exceeded_total", "Requests cancelled at their timeout_s", registry=r)
        self.jobs_resent = Counter(
            "qtts_job_items_resent_total", "Job items sent to the workers again: the broker had lost them", registry=r
        )
        self.streams = Gauge("qtts_streams", "Audio streams in progress (HTTP and WebSocket)", registry=r)
        self.loop_lag = Histogram(
            "qtts_event_loop_lag_seconds",
            "How much later than due the event loop ran a probe that wakes every 25 ms (see api/loop_lag.py)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.engines = EngineCollector()
        r.register(self.engines)
        PAUSES.install()  # process-wide, like the collector it counts
        r.register(PAUSES)
        r.register(OutageCollector())

    def render(self) -> bytes:
        return generate_latest(self.registry)
