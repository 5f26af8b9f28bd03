"""A frame's output on its way to the host, so the step loop can queue the next frame before reading it.

The GPU would otherwise sit idle between frames while the host reads a frame, hands out its audio and
admits newcomers (1.6 ms of a 13.3 ms step at 64 streams, H100). On CUDA each frame's output is copied to
pinned host memory right behind the frame, into one of two buffers in turn: frame N+1 can then be queued
(and its own copy behind it) while frame N's copy is still waiting to be read. Both copies run on the step
stream in order, so frame N's copy has finished before frame N+2's can reuse its buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sequence import Sequence, SequenceStatus


@dataclass(eq=False)
class PendingFrame:
    """A frame queued on the GPU whose output the host has not read yet.

    `running[i]` is the request that held row i when the frame was queued: rows move at the next
    compaction, the frame's output does not. `host` is its output on the host (on CUDA, written once
    `done` has fired); `started`/`done` time the frame and its copy on the GPU.
    """

    running: list[Sequence]
    host: Tensor
    started: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None

    @property
    def live(self) -> bool:
        """Whether any of its requests still wants the frame (all may have left since it was queued)."""
        return any(seq.status is SequenceStatus.RUNNING for seq in self.running)


class FrameReadback:
    """Queues each frame's output copy to the host and reads it back when the step loop asks."""

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.gpu_seconds = 0.0  # frames and their copies, on the GPU
        if self.cuda:
            self._buffers = [torch.empty(rows, width, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._next = 0

    def begin(self) -> torch.cuda.Event | None:
        """Mark where the frame starts on the stream (call before queueing it)."""
        if not self.cuda:
            return None
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        return started

    def queue(self, running: list[Sequence], out: Tensor, started: torch.cuda.Event | None) -> PendingFrame:
        """Queue the copy of the frame's output `out` (rows 0..n-1 hold `running`) without waiting for it."""
        n = len(running)
        if not self.cuda:
            return PendingFrame(list(running), out[:n].clone())  # the frame already ran
        host = self._buffers[self._next][:n]
        self._next ^= 1
        host.copy_(out[:n], non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return PendingFrame(list(running), host, started, done)

    def read(self, frame: PendingFrame) -> Tensor:
        """The frame's output on the host, waiting for the GPU if it is not there yet."""
        if frame.done is None:
            return frame.host
        frame.done.synchronize()
        if frame.started is not None:
            self.gpu_seconds += frame.started.elapsed_time(frame.done) / 1000
        return frame.host.clone()  # the frame after next reuses the buffer
