"""Joining the segments of a long text without clicks.

Each segment is generated on its own, so its first and last samples need not meet the neighbour's:
a jump there is an audible click. A short fade-out at the end of a segment and fade-in at the start
of the next (10 ms: too short to hear as a fade, long enough to remove the step) makes every join
smooth. Whole audio and streamed audio are joined the same way, so both give the same samples.
"""

from __future__ import annotations

import numpy as np

FADE_S = 0.010


def _ramp(n: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n + 2, dtype=np.float32)[1:-1]


def join_segments(parts: list[np.ndarray], sample_rate: int) -> np.ndarray:
    """The segments' audio end to end, faded at the joins (not at the very start or end)."""
    joiner = SegmentJoiner(sample_rate)
    out = []
    for i, part in enumerate(parts):
        out.append(joiner.add(part))
        out.append(joiner.end_segment(last=i == len(parts) - 1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


class SegmentJoiner:
    """Streaming form: `add` a segment's chunks as they come, `end_segment` after each segment.

    The last `fade` samples are held back until it is known whether the segment goes on (they go
    out as they are with the next chunk) or ends (they go out faded, except after the last segment:
    the end of speech is left as generated). Every segment but the first is faded in.
    """

    def __init__(self, sample_rate: int) -> None:
        self.fade = max(1, int(sample_rate * FADE_S))
        self._held = np.zeros(0, dtype=np.float32)
        self._segments = 0  # segments ended so far
        self._fresh = True  # the next samples start a segment

    def add(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._fresh and len(samples):
            self._fresh = False
            if self._segments:
                samples = samples.copy()
                n = min(self.fade, len(samples))
                samples[:n] *= _ramp(self.fade)[:n]
        both = np.concatenate((self._held, samples))
        cut = max(0, len(both) - self.fade)
        self._held = both[cut:]
        return both[:cut]

    def end_segment(self, *, last: bool = False) -> np.ndarray:
        tail = self._held
        if len(tail) and not last:
            tail = tail * _ramp(self.fade)[::-1][-len(tail) :]
        self._held = np.zeros(0, dtype=np.float32)
        if not self._fresh:
            self._segments += 1
        self._fresh = True
        return tail.astype(np.float32)
