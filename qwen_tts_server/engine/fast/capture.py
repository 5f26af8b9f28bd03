"""Where CUDA graphs are captured: a stream of its own per graph owner, and the warm-up on it.

PyTorch keeps one cuBLAS (and cuBLASLt) workspace per (thread's handle, stream), and a captured matrix
product keeps the address of the workspace of the stream it was captured on. Graphs captured on one stream
by one thread share one workspace; replayed at the same time from two threads (the step thread's frame
graphs, the codec thread's decoder graphs, another model's engine), two matrix products that keep split-K
partial sums there corrupt each other: a frame or a streamed chunk goes wrong now and then, only on the GPU
(measured on the H200: 93 of 200 replays of two such graphs). So every owner of graphs (frame graphs, codec,
streaming decoder) captures on a stream no other live owner holds, and warms up on it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

POOL_SIZE = 32  # streams PyTorch keeps per device and priority, handed out in turn


def _pool_stream(device: torch.device) -> torch.cuda.Stream:
    # Priority -1: never the priority-0 stream `torch.cuda.graph` captures on by default.
    return torch.cuda.Stream(device, priority=-1)


class CaptureStreams:
    """The capture streams held by live graph owners, so that no two owners ever share one. PyTorch hands
    out streams from a pool of 32 in turn, so after enough engines came and went a new stream can be one a
    live owner holds: drawn again until it is not."""

    def __init__(self, new_stream: Callable[[torch.device], Any] = _pool_stream, pool_size: int = POOL_SIZE) -> None:
        self._new_stream, self._pool_size = new_stream, pool_size
        self._owners: dict[tuple[int, int], weakref.ref[Any]] = {}
        self._lock = threading.Lock()

    def take(self, device: torch.device, owner: Any) -> torch.cuda.Stream:
        """A stream for `owner`'s captures, held until `owner` is gone. Raises RuntimeError when every
        stream of the pool is held (the caller's graph capture then fails and it runs eagerly)."""
        with self._lock:
            self._owners = {key: ref for key, ref in self._owners.items() if ref() is not None}
            for _ in range(self._pool_size):
                stream = self._new_stream(device)
                key = (stream.device_index, stream.cuda_stream)
                if key not in self._owners:
                    self._owners[key] = weakref.ref(owner)
                    return stream
        raise RuntimeError(f"all {self._pool_size} capture streams of {device} are held by live graph owners")


CAPTURE_STREAMS = CaptureStreams()


def capture_stream(device: torch.device, owner: Any) -> torch.cuda.Stream:
    """A stream for `owner` (frame graphs, codec, streaming decoder) to capture its graphs on; see above."""
    return CAPTURE_STREAMS.take(device, owner)


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
