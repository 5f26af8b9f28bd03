"""Speech speed (tempo) changes that keep the pitch, for the API's `speed` option.

Resampling would change speed and pitch together (chipmunk voices), so this uses FFmpeg's `atempo`
filter (WSOLA-style overlap-add) through PyAV's filter graph. The graph keeps its own state between
calls, so a stream can be sped up chunk by chunk as the model produces it, with the same result as
doing the whole audio at once.
"""

from __future__ import annotations

import math
from fractions import Fraction

import av
import av.filter
import numpy as np

SPEED_MIN, SPEED_MAX = 0.25, 4.0
# One atempo instance accepts 0.5..100; slower speeds chain two, each taking the square root.
_ATEMPO_MIN = 0.5
# Frames pushed into the graph are at most this long, so one huge call does not become one huge frame.
_PUSH_BLOCK = 16384


def check_speed(speed: float) -> float:
    """The speed as a float; ValueError when it is not a finite number in [SPEED_MIN, SPEED_MAX]."""
    speed = float(speed)
    if not math.isfinite(speed) or not SPEED_MIN <= speed <= SPEED_MAX:
        raise ValueError(f"speed must be between {SPEED_MIN} and {SPEED_MAX}, got {speed}")
    return speed


def _atempo_factors(speed: float) -> list[float]:
    if speed >= _ATEMPO_MIN:
        return [speed]
    root = math.sqrt(speed)
    return [root, root]


class TempoChanger:
    """Streaming tempo change of float32 mono audio: `process` chunks, then `flush` once.

    Output trails input by the filter's window (tens of milliseconds), which `flush` releases.
    speed 1.0 passes audio through untouched. Not thread-safe: one stream, one caller.
    """

    def __init__(self, speed: float, sample_rate: int) -> None:
        self.speed = check_speed(speed)
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.sample_rate = int(sample_rate)
        self._time_base = Fraction(1, self.sample_rate)
        self._pts = 0
        self._flushed = False
        self._graph = None if self.speed == 1.0 else self._build_graph()

    def _build_graph(self) -> av.filter.Graph:
        graph = av.filter.Graph()
        node = graph.add_abuffer(sample_rate=self.sample_rate, format="flt", layout="mono", time_base=self._time_base)
        for factor in _atempo_factors(self.speed):
            tempo = graph.add("atempo", f"{factor:.9f}")
            node.link_to(tempo)
            node = tempo
        sink = graph.add("abuffersink")
        node.link_to(sink)
        graph.configure()
        return graph

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Feed one chunk; return the stretched audio that is ready (possibly empty)."""
        if self._flushed:
            raise RuntimeError("process() after flush()")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._graph is None:
            return x.copy()
        out: list[np.ndarray] = []
        for start in range(0, x.shape[0], _PUSH_BLOCK):
            self._graph.push(self._frame(x[start : start + _PUSH_BLOCK]))
            out.extend(self._pull())
        return _joined(out)

    def flush(self) -> np.ndarray:
        """End of input: return what the filter still holds. Later calls return nothing."""
        if self._flushed or self._graph is None:
            self._flushed = True
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        self._graph.push(None)
        return _joined(self._pull())

    def _frame(self, x: np.ndarray) -> av.AudioFrame:
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += x.shape[0]
        return frame

    def _pull(self) -> list[np.ndarray]:
        assert self._graph is not None
        out: list[np.ndarray] = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):  # needs more input / finished
                return out
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def change_tempo(samples: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Whole audio at `speed` times the tempo, same pitch; ValueError for a speed out of range."""
    changer = TempoChanger(speed, sample_rate)
    head = changer.process(samples)
    return np.concatenate([head, changer.flush()])
