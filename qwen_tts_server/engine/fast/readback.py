"""A frame's output on its way to the host, so the step loop can queue the next frame before reading it.

The GPU would otherwise sit idle between frames while the host reads a frame, hands out its audio and
admits newcomers (1.6 ms of a 13.3 ms step at 64 streams, H100). On CUDA each frame's output is copied to
pinned host memory right behind the frame, into one of two buffers in turn. A buffer is safe to reuse once
the frame that last wrote it has been read or given up: the step loop reads frame N in the step that queues
frame N+1, so frame N+2's copy never lands on an unread frame (`queue` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sequence import Sequence


@dataclass(eq=False)
class PendingFrame:
    """A frame queued on the GPU whose output the host has not read yet.

    `running[i]` is the request that held row i when the frame was queued: rows move at the next
    compaction, the frame's output does not. `host` is its output on the host (on CUDA, written once
    `buffer`'s copy has finished).
    """

    running: list[Sequence]
    host: Tensor
    buffer: int = -1  # which pinned buffer (CUDA); -1: `host` already holds the output


class FrameReadback:
    """Queues each frame's output copy to the host and reads it back when the step loop asks."""

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.gpu_seconds = 0.0  # frames read (and their copies), on the GPU
        count = 2 if self.cuda else 0
        self._buffers = [torch.empty(rows, width, dtype=torch.long, pin_memory=True) for _ in range(count)]
        # Per buffer: events around its frame on the stream (start recorded before the frame is queued).
        self._events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)
        ]
        self._unread: list[PendingFrame | None] = [None] * count
        self._next = 0

    def begin(self) -> None:
        """Mark where the next frame starts on the stream (call right before queueing it)."""
        if self.cuda:
            self._events[self._next][0].record()

    def queue(self, running: list[Sequence], out: Tensor) -> PendingFrame:
        """Queue the copy of the frame's output `out` (rows 0..n-1 hold `running`) without waiting for it."""
        n = len(running)
        if not self.cuda:
            return PendingFrame(list(running), out[:n].clone())  # the frame already ran
        index = self._next
        assert self._unread[index] is None, "a frame's output buffer was reused before the frame was read"
        self._next ^= 1
        host = self._buffers[index][:n]
        host.copy_(out[:n], non_blocking=True)
        self._events[index][1].record()
        frame = self._unread[index] = PendingFrame(list(running), host, index)
        return frame

    def read(self, frame: PendingFrame) -> Tensor:
        """The frame's output on the host, waiting for the GPU if it is not there yet."""
        if frame.buffer < 0:
            return frame.host
        started, done = self._events[frame.buffer]
        done.synchronize()
        self.gpu_seconds += started.elapsed_time(done) / 1000
        self.forget(frame)
        return frame.host.clone()  # the frame after next reuses the buffer

    def forget(self, frame: PendingFrame | None) -> None:
        """Give up a frame nobody will read (everyone in it left): its buffer is free for the frame after next,
        whose copy the stream orders behind this one's."""
        if frame is not None and frame.buffer >= 0 and self._unread[frame.buffer] is frame:
            self._unread[frame.buffer] = None
