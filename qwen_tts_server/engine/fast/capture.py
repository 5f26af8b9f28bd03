"""Where CUDA graphs are captured: a stream of its own per graph owner, and the warm-up on it.

PyTorch keeps one cuBLAS (and cuBLASLt) workspace per (thread's handle, stream), and a captured matrix
product keeps the address of the workspace of the stream it was captured on. Graphs captured on one stream
by one thread share one workspace; replayed at the same time from two threads (the step thread's frame
graphs, the codec thread's decoder graphs, another model's engine), two matrix products that keep split-K
partial sums there corrupt each other: a frame or a streamed chunk goes wrong now and then, only on the GPU
(measured on the H200: 93 of 200 replays of two such graphs). So every owner of graphs (frame graphs, codec,
streaming decoder) captures on a stream no other live owner holds, and warms up on it: `GraphPool`. (Prefill's
graphs share the frame graphs' stream: both are replayed on the step stream, one after the other.)
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")

POOL_SIZE = 32  # streams PyTorch keeps per device and priority, handed out in turn
CAPTURE_PRIORITY = -1  # never the priority-0 stream `torch.cuda.graph` captures on by default


def _pool_stream(device: torch.device, priority: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device, priority=priority)


class StreamRegistry:
    """The CUDA streams of live owners (graph owners, an engine's step and codec streams), so that no two
    owners ever share one, and so that an owner's streams go to the next owner once it is gone.

    Sharing: PyTorch hands out streams from a pool of 32 per priority in turn, so after enough engines came
    and went a new stream can be one a live owner holds: drawn again until it is not. Reuse: every new
    (thread's cuBLAS handle, stream) pair gets a 32 MiB cuBLAS workspace for the life of the process (or
    until the last engine goes, `memory.CudaEngines`), so an engine built on fresh streams while another
    model stays loaded left ~160 MiB behind at every unload (GPU test tier, 2026-12-04). A freed stream is
    handed out again first; the next engine's threads reuse the old ones' handles from PyTorch's pool, so
    the same workspaces serve it."""

    def __init__(
        self, new_stream: Callable[[torch.device, int], Any] = _pool_stream, pool_size: int = POOL_SIZE
    ) -> None:
        self._new_stream, self._pool_size = new_stream, pool_size
        self._owners: dict[tuple[int, int], tuple[weakref.ref[Any], Any, int, str]] = {}
        self._free: dict[tuple[int, int, str], list[Any]] = {}  # (device index, priority, role) -> streams
        self._lock = threading.Lock()

    def take(
        self, device: torch.device, owner: Any, priority: int = CAPTURE_PRIORITY, role: str = "capture"
    ) -> torch.cuda.Stream:
        """A stream for `owner`, held until `owner` is gone. A gone owner's stream goes to the next owner in
        the same `role` (a step stream becomes the next engine's step stream), so each role's thread meets
        the same streams again. Raises RuntimeError when every stream of the pool is held (a graph capture
        then fails and its owner runs eagerly)."""
        with self._lock:
            self._collect()
            free = self._free.get((_index(device), priority, role))
            if free:
                return self._hold(free.pop(), owner, priority, role)
            free_keys = {_key(stream) for streams in self._free.values() for stream in streams}
            for _ in range(self._pool_size):
                stream = self._new_stream(device, priority)
                if _key(stream) not in self._owners and _key(stream) not in free_keys:
                    return self._hold(stream, owner, priority, role)
        raise RuntimeError(f"all {self._pool_size} streams of {device} at priority {priority} are held by live owners")

    def _hold(self, stream: Any, owner: Any, priority: int, role: str) -> Any:
        self._owners[_key(stream)] = (weakref.ref(owner), stream, priority, role)
        return stream

    def _collect(self) -> None:
        """Streams whose owner is gone become free."""
        for key, (ref, stream, priority, role) in list(self._owners.items()):
            if ref() is None:
                del self._owners[key]
                self._free.setdefault((stream.device_index, priority, role), []).append(stream)


def _key(stream: Any) -> tuple[int, int]:
    return stream.device_index, stream.cuda_stream


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


STREAMS = StreamRegistry()


def engine_stream(device: torch.device, owner: Any, priority: int, role: str) -> torch.cuda.Stream:
    """A stream for an engine's own work (`role` "step" or "codec"), reused by later engines in that role."""
    return STREAMS.take(device, owner, priority, role)


@contextlib.contextmanager
def warm_up_on(stream: torch.cuda.Stream, device: torch.device) -> Iterator[None]:
    """Run a capture's warm-up on its capture stream, ordered after the current stream's work and before
    what follows. Warming up on that stream (not on a new side stream per capture) keeps the cuBLAS
    workspaces to one per capture stream: each new stream costs a 32 MiB workspace for the life of the
    process, about 1 GB over an engine's captures (bench/unload_probe.py)."""
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:  # also when the warm-up fails: what the current stream does next must not overtake it
        current.wait_stream(stream)


class GraphPool:
    """One owner's CUDA graphs (frame graphs, codec, streaming decoder, prefill): captured on the owner's own
    stream (taken at the first capture, held while this pool lives; see above), each warmed up there first,
    all sharing one memory pool. `share_stream_of`: capture on another pool's stream instead (graphs that
    are replayed one after the other on one stream may share its cuBLAS workspace). `stream`: capture on this
    one, which the caller holds (a green context's stream, say)."""

    def __init__(
        self,
        device: torch.device,
        role: str,
        share_stream_of: GraphPool | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        self.device, self.role = device, role
        self._shared = share_stream_of
        self._stream: Any = stream
        self._pool: Any = None

    def stream(self) -> torch.cuda.Stream:
        """The stream this pool's graphs are captured on."""
        if self._shared is not None:
            return self._shared.stream()
        if self._stream is None:
            self._stream = STREAMS.take(self.device, self, role=f"capture:{self.role}")
        return self._stream

    def capture(self, run: Callable[[], T], warm_up: Callable[[], object] | None = None) -> tuple[Any, T]:
        """Run `warm_up` (default: `run`) once on the capture stream (compiles, kernel choices, workspaces),
        then capture `run` as one graph in this pool. Returns the graph and what `run` returned during the
        capture (the graph's outputs: each replay overwrites them)."""
        stream = self.stream()
        with warm_up_on(stream, self.device):
            (warm_up or run)()
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        try:
            # thread_local: other threads (prompt building, the codec thread) may use the GPU meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                out = run()
        finally:  # a capture that fails in capture_end leaves the capture stream current: never keep it
            torch.cuda.set_stream(current)
        self._pool = graph.pool()
        return graph, out

    def release(self) -> None:
        """Forget the memory pool (the owner dropped its graphs): it is freed once no graph holds it."""
        self._pool = None
