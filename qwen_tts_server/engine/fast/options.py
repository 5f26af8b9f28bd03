"""The fast engine's choices that the server's settings name: how each is spelled and its default, in one place.

config.py's settings (what a user sets), `FastRuntime` and `FastEngine` (what tests and benchmarks build) take
them from here, so a default changed here changes for all three. No torch here: config.py imports it.

Not here: what differs on purpose. The server turns the fused attention on (`all`) and waits 40 ms to admit and
100 ms to gather codec work; an engine built directly (tests, benchmarks) runs the torch path and never waits
unless asked.
"""

from __future__ import annotations

from typing import Literal

# Which decode layers run their attention as one Triton kernel (attention_kernel.py): none, the code
# predictor's, or the talker's too.
FusedAttention = Literal["off", "predictor", "all"]
# What of the streaming codec decoder torch.compile fuses (stream_codec.py): nothing, SnakeBeta alone, the
# whole step.
CodecCompile = Literal["off", "snake", "step"]
# How audio is decoded in chunks: carrying the decoder's causal state (exact), or re-decoding 25 frames of
# left context before each chunk (approximate).
StreamDecoder = Literal["stateful", "context"]

COMPILE_CODEC: CodecCompile = "snake"
STREAM_DECODER: StreamDecoder = "stateful"
STREAM_FIRST_FRAMES = 2  # frames (80 ms each) in a stream's first audio chunk
STREAM_CHUNK_FRAMES = 12  # the largest chunk: a stream's chunks double from the first up to this
MAX_CONTEXT = 4096  # prompt + frames of one request (the KV cache's length)
MAX_PREFILL_TOKENS = 2048  # prompt positions admitted in one step
CODEC_GATHER_STREAMS = 16  # streams whose patient chunks a codec batch waits for (codec_worker.py)
