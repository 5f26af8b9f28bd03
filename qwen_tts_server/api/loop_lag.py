"""How late the server's event loop runs work that is due, for /metrics (`qtts_event_loop_lag_seconds`).

Every request's I/O waits on this one loop: each streamed chunk written, each new request parsed and its
prompt handed on. Work that holds the loop (Python on it, or a thread that keeps the GIL) delays all of them
at once: first bytes, the ends of streams, the next request of a closed loop of clients. A probe sleeps
PROBE_INTERVAL_S again and again and records how much later than asked it woke each time.

It reads `time.perf_counter`, not `loop.time()`: under uvloop (uvicorn's default) the loop's clock is libuv's,
cached once an iteration in whole milliseconds, so lateness read from it is 0 or 1 ms, never in between.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Histogram

PROBE_INTERVAL_S = 0.025  # 40 wake-ups a second: nothing next to a request's work


async def watch_event_loop(lag: Histogram, interval_s: float = PROBE_INTERVAL_S) -> None:
    """Observe the running loop's lateness into `lag` until cancelled."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(interval_s)
        lag.observe(max(0.0, time.perf_counter() - asked - interval_s))
