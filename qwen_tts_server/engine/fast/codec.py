"""Codec decode for the fast engine: frames to 24 kHz audio, batched, and CUDA-graphed on the GPU.

Upstream's tokenizer decode pads a batch with -1 (then clamps to 0), runs the 12 Hz decoder in
chunks of 300 frames with 25 frames of left context, and cuts each row to its own length. The
decoder is causal throughout (causal convolutions and transposed convolutions, a causal
sliding-window transformer), so padding a row on the right changes none of its samples. Rows are
therefore padded to a fixed (batch, length) bucket, and on CUDA each bucket is one captured graph:
a decode is one launch instead of thousands of small kernels, each a Python call that would
compete with the step thread for the GIL. Without graphs (CPU) the same padded batches run
eagerly. Utterances longer than one chunk take upstream's own chunked path. The graphs are captured on
a stream of their own (`capture.GraphPool`), so that they never share a cuBLAS workspace with the frame graphs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .capture import GraphPool

log = logging.getLogger(__name__)

CHUNK_FRAMES = 300  # upstream's chunked_decode chunk: longer utterances decode in several passes
LENGTH_BUCKET = 32  # frames; rows are padded to a multiple of this
BATCH_BUCKETS = (1, 2, 4, 8, 16)


def codec_batches(lengths: list[int], max_frames: int) -> list[list[int]]:
    """Group indices into codec calls: similar lengths together (the codec pads to the longest), at
    most `max_frames` padded frames per call (a longer item goes alone), so a burst of finished
    requests cannot exhaust GPU memory."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):  # ascending: i is its group's longest
        if groups and (len(groups[-1]) + 1) * lengths[i] <= max_frames:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class CodecDecoder:
    """Decodes lists of [T, 16] code tensors to float32 audio, in bounded, bucketed batches.

    `max_batch_frames` bounds the padded frames of one call (memory: about 4.3 MB per frame of
    activations in bf16, gpu-device.md), and so the largest graph.
    """

    def __init__(self, speech_tokenizer: Any, *, graphs: bool, max_batch_frames: int = 1024) -> None:
        self.tokenizer = speech_tokenizer
        self.decoder = speech_tokenizer.model.decoder
        self.samples_per_frame = int(self.decoder.total_upsample)
        self.device = next(self.decoder.parameters()).device
        self.max_batch_frames = max_batch_frames
        self.use_graphs = graphs and self.device.type == "cuda"
        if self.device.type == "cuda":
            # cuDNN's heuristics gave the decoder's bf16 convolutions slow generic kernels (implicit_convolve_sgemm,
            # 3.7 ms a call in a traced stream). Timing the candidates once per shape, at the graph warm-up,
            # took 16 lockstep streams from 719 to 996 audio-s/s (bench.bench_stream_codec, H200). Process-wide;
            # shapes outside the graphs pay the timing at their first use.
            torch.backends.cudnn.benchmark = True
        self._graphs: dict[tuple[int, int], tuple[Any, Tensor, Tensor]] = {}
        self._pool = GraphPool(self.device, "CodecDecoder")

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, length) bucket within the frame bound."""
        lengths = range(LENGTH_BUCKET, _round_up(CHUNK_FRAMES, LENGTH_BUCKET) + 1, LENGTH_BUCKET)
        return [(b, t) for t in lengths for b in BATCH_BUCKETS if b * t <= max(self.max_batch_frames, t)]

    def __len__(self) -> int:
        """Captured graphs."""
        return len(self._graphs)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Capture every bucket's graph now (at model start), never while serving."""
        if not self.use_graphs:
            return
        for rows, frames in self.shapes():
            if (rows, frames) not in self._graphs:
                self._graphs[rows, frames] = self._capture(rows, frames)

    def release_graphs(self) -> None:
        """Drop every captured graph and its memory pool (the engine stopped); decodes after this run eagerly."""
        self._graphs.clear()
        self._pool.release()
        self.use_graphs = False

    def decode(self, codes: list[Tensor]) -> list[np.ndarray]:
        """Audio of each [T_i, 16] code tensor: T_i x samples_per_frame float32 samples, in order."""
        out: list[np.ndarray | None] = [None] * len(codes)
        lengths = [int(c.shape[0]) for c in codes]
        limit = max(self.max_batch_frames, LENGTH_BUCKET)
        for group in codec_batches([_round_up(n, LENGTH_BUCKET) for n in lengths], limit):
            for start in range(0, len(group), BATCH_BUCKETS[-1]):
                part = group[start : start + BATCH_BUCKETS[-1]]
                for i, wav in zip(part, self._decode([codes[i] for i in part]), strict=True):
                    out[i] = wav
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _decode(self, codes: list[Tensor]) -> list[np.ndarray]:
        lengths = [int(c.shape[0]) for c in codes]
        if max(lengths) > CHUNK_FRAMES:
            wavs, _ = self.tokenizer.decode([{"audio_codes": c} for c in codes])
            return [np.asarray(w, dtype=np.float32).reshape(-1) for w in wavs]
        rows = next(b for b in BATCH_BUCKETS if b >= len(codes))
        frames = _round_up(max(lengths), LENGTH_BUCKET)
        padded = torch.zeros(rows, 16, frames, dtype=torch.long)  # pad code 0, as upstream's clamp of -1
        for i, c in enumerate(codes):
            padded[i, :, : c.shape[0]] = c.T
        entry = self._graphs.get((rows, frames))
        if entry is None:
            wav = self.decoder(padded.to(self.device))
        else:
            graph, static_codes, wav = entry
            static_codes.copy_(padded, non_blocking=True)
            graph.replay()
        audio = wav[: len(codes), 0].float().cpu().numpy()
        return [audio[i, : n * self.samples_per_frame].copy() for i, n in enumerate(lengths)]

    def _capture(self, rows: int, frames: int) -> tuple[Any, Tensor, Tensor]:
        static_codes = torch.zeros(rows, 16, frames, dtype=torch.long, device=self.device)
        graph, static_wav = self._pool.capture(lambda: self.decoder(static_codes))
        return graph, static_codes, static_wav
