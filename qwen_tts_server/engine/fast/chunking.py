"""When a streaming request's frames go to the codec thread: in which chunk sizes, and which chunks may wait.

A stream's chunks start small (its listener hears audio at once) and double up to the largest size, which
repeats; every chunk is one of these sizes (the last may be shorter), so every chunk decode is a captured
graph. A chunk is `patient` (may wait in the codec thread for other streams' chunks, see codec_worker) only
while its stream is well ahead of real time; a stream's first chunks and its last never are. A stream nobody
listens to (a whole utterance decoded while it runs) goes in the largest chunks, all patient but its last.
"""

from __future__ import annotations

from ..types import FRAME_RATE_HZ
from .codec_worker import CodecJob
from .sequence import AudioStream, Sequence, SequenceStatus

# A stream's chunk may wait for other streams' in the codec thread only while the stream is at least this far
# ahead of real time, besides the wait itself: its listener never runs dry.
PATIENT_LEAD_S = 1.0


def stream_chunk_sizes(first: int, largest: int) -> list[int]:
    """A stream's chunk sizes in frames: `first`, then doubling up to `largest`, which repeats.

    Each chunk takes about as many steps to generate as it has frames, and the steps are several
    times faster than real time, so a chunk twice the size of the one before still arrives before
    that one has played: the player never starves, and most of the audio goes in large chunks."""
    sizes = [min(first, largest)]
    while sizes[-1] < largest:
        sizes.append(min(sizes[-1] * 2, largest))
    return sizes


class StreamChunker:
    """Cuts running streams' frames into codec jobs, in the sizes of `sizes` (see the module doc)."""

    def __init__(self, sizes: list[int], wait_s: float) -> None:
        self.sizes = sizes
        self.wait_s = wait_s  # how long a patient chunk may wait in the codec thread

    def chunks(self, running: list[Sequence], now: float) -> list[CodecJob]:
        """The next chunk of each stream still running whose frames for it exist."""
        jobs = []
        for seq in running:
            stream = seq.stream
            if stream is None or seq.status is SequenceStatus.FINISHED:
                continue
            size = self.next_size(stream)
            if seq.num_frames - stream.sent >= size:
                patient = not stream.listened or lead_s(stream, now) > PATIENT_LEAD_S + self.wait_s
                jobs.append(CodecJob(seq, stream.sent, stream.sent + size, patient=patient))
                if stream.first_sent_at is None:
                    stream.first_sent_at = now
                stream.sent += size
                stream.chunks += 1
        return jobs

    def next_size(self, stream: AudioStream) -> int:
        """The size of a stream's next chunk: the next in `sizes` (the last repeats), or the largest for a
        stream nobody listens to yet."""
        if not stream.listened:
            return self.sizes[-1]
        return self.sizes[min(stream.chunks, len(self.sizes) - 1)]

    @staticmethod
    def last(seq: Sequence) -> CodecJob:
        """The last chunk of a stream that ended: whatever frames are left (never patient)."""
        assert seq.stream is not None
        job = CodecJob(seq, seq.stream.sent, seq.num_frames, final=True)
        seq.stream.sent = seq.num_frames
        return job


def lead_s(stream: AudioStream, now: float) -> float:
    """How far ahead of real time a stream is: the audio handed to the codec so far, less the time
    since its first chunk was (about when its listener began to play it)."""
    if stream.first_sent_at is None:
        return 0.0
    return stream.sent / FRAME_RATE_HZ - (now - stream.first_sent_at)
