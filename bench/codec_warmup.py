"""What the codec costs a model's load, with cuDNN's benchmark mode on (the server's setting, `CodecDecoder`)
and off, and what the mode buys once the graphs are captured.

Per process, one mode: builds the full-size codec with random weights on the GPU (bf16), captures the
whole-utterance decoder's graphs (`CodecDecoder.warm_up`, every (batch, length) bucket) and the streaming
decoder's (`StreamingDecoder.capture_all` at the fast engine's batch buckets up to `--max-slots` and the
chunk sizes of the default stream settings), timing each, then times decodes through those graphs: 8
utterances of 100 frames (whole) and `--streams` streams' 12-frame chunks. Run it once per mode (the mode is
process-wide and cuDNN's timing cache lives in the process):

    python -m bench.codec_warmup --cudnn-benchmark off --out "$OUT"; python -m bench.codec_warmup --out "$OUT"

Prints a line of results; writes <out>/<date>-<card>-codec-warmup-<mode>.json. `--device cpu` is a smoke run
(no graphs; the whole decode of 8 x 100 frames takes ~90 s a call on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.bench_engines import build_speech_tokenizer, sync_device
from qwen_tts_server.engine.fast.chunking import stream_chunk_sizes
from qwen_tts_server.engine.fast.codec import CodecDecoder
from qwen_tts_server.engine.fast.engine import batch_buckets
from qwen_tts_server.engine.fast.options import STREAM_CHUNK_FRAMES, STREAM_FIRST_FRAMES
from qwen_tts_server.engine.fast.stream_codec import StreamingDecoder


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` (after one untimed call), the device synchronized around each."""
    fn()
    times = []
    for _ in range(repeats):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B"])
    p.add_argument("--cudnn-benchmark", default="on", choices=["on", "off"])
    p.add_argument("--max-slots", type=int, default=128, help="the engine's rows: the streaming decoder's buckets")
    p.add_argument("--streams", type=int, default=16, help="streams per timed chunk decode")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (no graphs, fp32)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    device = torch.device(args.device)
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda:
        torch.cuda.set_device(device)

    t0 = time.perf_counter()
    tokenizer = build_speech_tokenizer(args.size, device, torch.bfloat16 if cuda else torch.float32)
    sync_device(device)
    build_s = time.perf_counter() - t0
    codec = CodecDecoder(tokenizer, graphs=True)  # turns the mode on, as the server does
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"

    sync_device(device)
    t0 = time.perf_counter()
    codec.warm_up()
    sync_device(device)
    whole_capture_s = time.perf_counter() - t0
    streaming = StreamingDecoder(codec.decoder)
    buckets = batch_buckets(args.max_slots)  # the engine's stream_buckets
    chunks = stream_chunk_sizes(STREAM_FIRST_FRAMES, STREAM_CHUNK_FRAMES)  # the engine's default chunks
    t0 = time.perf_counter()
    if cuda:
        streaming.capture_all(buckets, chunks)
    sync_device(device)
    stream_capture_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(0)
    utterances = [torch.randint(0, 2048, (100, 16), generator=gen) for _ in range(8)]
    whole_s = timed(lambda: codec.decode(utterances), device, args.repeats)
    states = [streaming.new_state() for _ in range(args.streams)]
    chunk = [torch.randint(0, 2048, (12, 16), generator=gen) for _ in range(args.streams)]
    chunk_s = timed(lambda: streaming.decode(states, chunk), device, args.repeats)

    result = {
        "card": torch.cuda.get_device_name(device) if cuda else "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cudnn_benchmark": args.cudnn_benchmark,
        "codec_build_s": round(build_s, 1),
        "whole_graphs": len(codec),
        "whole_capture_s": round(whole_capture_s, 1),
        "stream_graphs": len(streaming),
        "stream_capture_s": round(stream_capture_s, 1),
        "whole_8x100_ms": round(1000 * whole_s, 2),
        "whole_audio_s_per_s": round(8 * 100 / 12.5 / whole_s, 1),
        f"stream_{args.streams}x12_ms": round(1000 * chunk_s, 2),
        "stream_audio_s_per_s": round(args.streams * 12 / 12.5 / chunk_s, 1),
    }
    print(json.dumps(result), flush=True)
    if args.out:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{result['date']}-{result['card']}").strip("-")
        path = Path(args.out) / f"{name}-codec-warmup-{args.cudnn_benchmark}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
