"""One request's state inside the fast engine (nano-vllm's `Sequence`, for codec frames)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import Tensor

from ..types import FinishReason
from .prompt import Prompt

__all__ = ["AudioStream", "FinishReason", "Sequence", "SequenceSampling", "SequenceStatus"]

_ids = itertools.count()


class SequenceStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SequenceSampling:
    """Resolved decoding options of one request (checkpoint defaults already applied).

    The field defaults are upstream's hard defaults, the one copy of them: what a request gets where neither
    it nor the checkpoint's generation_config says (`runtime.resolve_sampling`)."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    subtalker_do_sample: bool = True
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    seed: int = 0
    min_frames: int = 0  # EOS is ignored before this many frames (benchmarks force exact lengths)

    def talker_columns(self) -> dict[str, Any]:
        """The options of codebook 0 (the talker), named as `RowSampling`'s columns."""
        return {
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }

    def predictor_columns(self) -> dict[str, Any]:
        """The options of codebooks 1-15 (the code predictor): upstream applies no repetition penalty there."""
        return {
            "do_sample": self.subtalker_do_sample,
            "temperature": self.subtalker_temperature,
            "top_k": self.subtalker_top_k,
            "top_p": self.subtalker_top_p,
            "repetition_penalty": 1.0,
            "seed": self.seed,
        }


@dataclass(eq=False)
class AudioStream:
    """A request whose audio is decoded while it is generated, chunk by chunk.

    The step thread hands the codec thread each chunk as soon as its frames exist, in the sizes of
    `StreamChunker.sizes` (small first: the listener hears audio at once and the next chunk always
    arrives before the audio so far has played). `on_audio` runs on the codec thread with each chunk's
    float32 samples, in order; the last chunk comes before `on_finish`.

    Without `on_audio` nobody listens yet: a whole utterance decoded while it runs, so that its codec work
    is spread over its frames (in the largest chunks, each of which may wait for other streams') instead
    of falling on its end. Its chunks are kept in `parts` and joined into the request's `audio` when its
    last one is decoded.
    """

    on_audio: Callable[[Sequence, Any], None] | None = None
    sent: int = 0  # frames handed to the codec so far
    chunks: int = 0  # chunks handed to the codec so far
    first_sent_at: float | None = None  # perf_counter when its first chunk went to the codec
    state: Any = None  # the chunk decoder's per-stream state (decoder caches), made on first use
    parts: list[Any] = field(default_factory=list)  # the chunks' audio so far, where nobody listens

    @property
    def listened(self) -> bool:
        return self.on_audio is not None


@dataclass(eq=False)
class Sequence:
    """A request from admission to its last frame.

    The engine's threads own the fields once it is submitted (`submit` clamps `max_frames`); other
    threads only call `FastEngine.cancel`. `on_frame` runs on the step thread, `on_finish` on the
    codec thread (or the step thread for cancelled requests, or the stopping thread at shutdown):
    both must hand work off quickly.
    """

    prompt: Prompt
    sampling: SequenceSampling
    max_frames: int
    on_frame: Callable[[Sequence, Tensor], None] | None = None
    on_finish: Callable[[Sequence], None] | None = None
    decode_audio: bool = True  # False: the caller takes the frames (a stream of codes); no codec decode
    stream: AudioStream | None = None  # set: its audio is decoded in chunks as it is generated (see AudioStream)
    id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    frames: list[Tensor] = field(default_factory=list)  # each [16] on the host
    finish_reason: FinishReason | None = None
    audio: object = None  # float32 samples once decoded
    error: BaseException | None = None
    ready: Any = None  # CUDA event recorded at submit: the prompt's tensors are ready on the GPU
    # time.perf_counter() when its prompt began to be built (the runtime sets it; else when this was made),
    # at submit, admission (prefill), first and last frame read (timing.RequestPhases).
    arrived_at: float = field(default_factory=time.perf_counter)
    submitted_at: float | None = None
    admitted_at: float | None = None
    first_frame_at: float | None = None
    last_frame_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return int(self.prompt.embeds.shape[0])

    @property
    def num_frames(self) -> int:
        return len(self.frames)
