"""Streaming codec decode: re-decode with left context vs. carried causal state, on the GPU.

Streaming speech needs audio chunk by chunk as codec frames arrive: a short first chunk (2 frames),
then longer ones (12 or 25 frames). Two ways, both measured here on one speech tokenizer, with B
streams in lockstep (every call decodes the same chunk of every stream):

* `redecode` (a): each chunk is decoded again with 25 frames of left context (upstream's
  `chunked_decode` context) by the plain decoder, keeping only the new audio. Approximate: the
  decoder's receptive field is longer than 25 frames. `eager`, and on CUDA `graph` (one CUDA
  graph per (batch, input length), as `CodecDecoder` does per bucket).
* `stream` (b): `StreamingDecoder`, which carries the decoder's causal state and decodes only the
  new frames. Exact. `eager`, and on CUDA `graph` (one graph per (batch, chunk length)); with
  `--compile` also `graph-snake` (SnakeBeta fused, as the server's default `compile_codec=snake`)
  and `graph-compiled` (the whole step compiled, as `compile_codec=step`); with `--channels-last` each
  graphed method again with the activations kept channels-innermost (`-cl`, `StreamingDecoder`).
* `whole`: the whole utterance in one decode, the reference point for speed and for audio.

Per method, batch and chunk size: audio seconds decoded per second of wall time (each call ends
with the copy of its audio to the host, so wall time is device time plus host overhead), first
chunk latency, steady chunk latency, and the largest difference from the whole decode's audio.
The table is printed; JSON goes to DIR/<date>-<card>-stream-codec.json (`--out`, default
bench/results).

On the GPU (full-size random codec, bf16; the codec is the same for 0.6B and 1.7B):
    python -m bench.bench_stream_codec --size 1.7B --device cuda
CPU smoke test on a tiny checkpoint (`qwen-tts-server make-test-models /tmp/m` builds them):
    OMP_NUM_THREADS=1 python -m bench.bench_stream_codec --device cpu --tiny /tmp/m --batches 1 4 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qwen_tts_server.engine.fast.stream_codec import DecoderState, StreamingDecoder

from .bench_http import git_commit

FRAME_S = 0.08  # audio seconds per codec frame (1920 samples at 24 kHz)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ---------------------------------------------------------------- setup


def load_speech_tokenizer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """A tiny checkpoint's speech tokenizer (`--tiny DIR`: a models dir or a speech_tokenizer dir),
    else a full-size random one built in memory as bench_engines does."""
    if args.tiny is None:
        from .bench_engines import build_speech_tokenizer

        return build_speech_tokenizer(args.size, device, dtype)
    from qwen_tts import Qwen3TTSTokenizer

    root = Path(args.tiny)
    found = [root] if (root / "preprocessor_config.json").exists() else sorted(root.glob("*/speech_tokenizer"))
    if not found:
        raise SystemExit(f"no speech tokenizer under {root}")
    return Qwen3TTSTokenizer.from_pretrained(str(found[0]), device_map=str(device), dtype=dtype)


def chunk_schedule(first: int, chunk: int, seconds: float) -> list[int]:
    """First chunk, then equal chunks, about `seconds` of audio in all."""
    rest = max(1, round((seconds / FRAME_S - first) / chunk))
    return [first] + [chunk] * rest


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- methods

# A method decodes one chunk of every stream: (start frame, frames) -> audio [B, frames x 1920].
ChunkFn = Callable[[int, int], np.ndarray]


class GraphedDecoder:
    """The plain decoder, one CUDA graph per (batch, input length), captured at first use."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self.pool: Any = None

    def reset(self) -> None:
        """Drop every graph and their memory pool (a pool whose graphs are gone cannot be reused)."""
        self.graphs.clear()
        self.pool = None
        torch.cuda.empty_cache()

    def __call__(self, codes: Tensor) -> Tensor:
        key = tuple(codes.shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(codes)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(codes)
        graph.replay()
        return static_out

    def _capture(self, codes: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = codes.clone()
        current = torch.cuda.current_stream(codes.device)
        side = torch.cuda.Stream(codes.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.decoder(static_in)  # warm-up: kernel choices, workspaces
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.decoder(static_in)
        self.pool = graph.pool()
        return graph, static_in, static_out


def redecode_method(decode: Callable[[Tensor], Tensor], codes: Tensor, context: int, spf: int) -> ChunkFn:
    """(a): decode [start - context, start + frames) and keep the last `frames` frames' audio."""

    def run(start: int, frames: int) -> np.ndarray:
        ctx = min(context, start)
        wav = decode(codes[:, :, start - ctx : start + frames])
        return wav[:, 0, ctx * spf :].float().cpu().numpy()

    return run


def stream_method(streaming: StreamingDecoder, codes: Tensor) -> tuple[ChunkFn, Callable[[], None]]:
    """(b): each stream's state carried across chunks; returns the chunk fn and a reset for a new pass."""
    frames_major = codes.transpose(1, 2)  # [B, N, 16]
    states: list[DecoderState] = []

    def reset() -> None:
        states[:] = [streaming.new_state() for _ in range(codes.shape[0])]

    def run(start: int, frames: int) -> np.ndarray:
        chunk = [frames_major[b, start : start + frames] for b in range(len(states))]
        return np.stack(streaming.decode(states, chunk))

    reset()
    return run, reset


# ---------------------------------------------------------------- measuring


@dataclass
class Result:
    method: str
    batch: int
    chunk: int
    schedule: list[int]
    totals_s: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    steady_ms: list[float] = field(default_factory=list)
    max_abs_vs_whole: float | None = None

    def row(self) -> dict[str, Any]:
        audio_s = self.batch * sum(self.schedule) * FRAME_S
        total = statistics.median(self.totals_s)
        return {
            "method": self.method,
            "batch": self.batch,
            "chunk": self.chunk,
            "frames": sum(self.schedule),
            "schedule": self.schedule,
            "audio_s_per_s": round(audio_s / total, 2),
            "pass_ms": round(total * 1e3, 2),
            "first_chunk_ms": round(statistics.median(self.first_ms), 2),
            "chunk_ms_p50": round(statistics.median(self.steady_ms), 2) if self.steady_ms else None,
            "chunk_ms_max": round(max(self.steady_ms), 2) if self.steady_ms else None,
            "max_abs_vs_whole": self.max_abs_vs_whole,
        }


def measure(
    result: Result,
    run: ChunkFn,
    device: torch.device,
    repeats: int,
    reference: np.ndarray | None,
    reset: Callable[[], None] | None = None,
) -> Result:
    """One untimed pass (graph capture, kernel choices; its audio is checked against the whole
    decode), then `repeats` timed passes, each call timed to the end of its host copy."""
    for attempt in range(repeats + 1):
        if reset is not None:
            reset()
        sync(device)
        start, lat, audio = 0, [], []
        for frames in result.schedule:
            t0 = time.perf_counter()
            audio.append(run(start, frames))
            lat.append(time.perf_counter() - t0)
            start += frames
        if attempt == 0:
            if reference is not None:
                result.max_abs_vs_whole = float(np.abs(np.concatenate(audio, axis=1) - reference).max())
            continue
        result.totals_s.append(sum(lat))
        result.first_ms.append(lat[0] * 1e3)
        result.steady_ms.extend(x * 1e3 for x in lat[1:])
    return result


def bench_config(
    decoder: nn.Module,
    streaming: StreamingDecoder,
    graphed: GraphedDecoder | None,
    batch: int,
    chunk: int,
    args: argparse.Namespace,
    device: torch.device,
) -> list[Result]:
    schedule = chunk_schedule(args.first, chunk, args.seconds)
    frames = sum(schedule)
    gen = torch.Generator().manual_seed(batch * 1000 + chunk)
    codes = torch.randint(0, 2048, (batch, 16, frames), generator=gen).to(device)
    spf = streaming.samples_per_frame

    whole = measure(
        Result("whole", batch, chunk, [frames]),
        lambda start, n: decoder(codes[:, :, start : start + n])[:, 0].float().cpu().numpy(),
        device,
        args.repeats,
        None,
    )
    with torch.inference_mode():
        reference = decoder(codes)[:, 0].float().cpu().numpy()
    whole.max_abs_vs_whole = 0.0
    results = [whole]
    results.append(
        measure(
            Result("redecode-eager", batch, chunk, schedule),
            redecode_method(decoder, codes, args.context, spf),
            device,
            args.repeats,
            reference,
        )
    )
    if graphed is not None:
        results.append(
            measure(
                Result("redecode-graph", batch, chunk, schedule),
                redecode_method(graphed, codes, args.context, spf),
                device,
                args.repeats,
                reference,
            )
        )
    run, reset = stream_method(streaming, codes)
    results.append(measure(Result("stream-eager", batch, chunk, schedule), run, device, args.repeats, reference, reset))
    if device.type == "cuda":
        compiled = ("stream-graph-snake", "stream-graph-compiled") if args.compile else ()
        names = ("stream-graph", *compiled)
        if args.channels_last:  # each graphed method again with the channels-last layout, named "...-cl"
            names = tuple(n for name in names for n in (name, f"{name}-cl"))
        if args.methods:
            if unknown := set(args.methods) - set(names):
                raise SystemExit(f"--methods {sorted(unknown)}: not among {list(names)} (--compile, --channels-last?)")
            names = tuple(name for name in names if name in args.methods)
        for name in names:
            graph_streaming = StreamingDecoder(decoder, channels_last=name.endswith("-cl"))
            base = name.removesuffix("-cl")
            graph_streaming.enable({"stream-graph-snake": "snake", "stream-graph-compiled": "step"}.get(base, "off"))
            t0 = time.perf_counter()
            for n in sorted(set(schedule)):
                graph_streaming.capture(batch, n)
            print(f"{name} B={batch}: captured in {time.perf_counter() - t0:.1f} s", flush=True)
            run, reset = stream_method(graph_streaming, codes)
            results.append(measure(Result(name, batch, chunk, schedule), run, device, args.repeats, reference, reset))
            del graph_streaming
            torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------- report


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'method':<24} {'batch':>5} {'chunk':>5} {'audio-s/s':>10} {'first ms':>9} "
        f"{'chunk p50':>9} {'chunk max':>9} {'max|diff|':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:

        def num(key: str, r: dict[str, Any] = r) -> str:
            return "-" if r[key] is None else f"{r[key]:.2f}"

        lines.append(
            f"{r['method']:<24} {r['batch']:>5} {r['chunk']:>5} {r['audio_s_per_s']:>10.1f} {num('first_chunk_ms'):>9} "
            f"{num('chunk_ms_p50'):>9} {num('chunk_ms_max'):>9} {r['max_abs_vs_whole']:>9.1e}"
        )
    return "\n".join(lines)


def write_json(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Path:
    now = datetime.datetime.now(datetime.timezone.utc)
    card = card_name(device)
    data = {
        "card": card,
        "date": now.strftime("%Y-%m-%d"),
        "commit": args.commit or git_commit() or "unknown",
        "started_at": now.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "bench.bench_stream_codec", *sys.argv[1:]]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "model": f"tiny ({args.tiny})" if args.tiny else f"{args.size} codec, random weights",
            "first_chunk": args.first,
            "context_frames": args.context,
            "seconds": args.seconds,
            "repeats": args.repeats,
        },
        "notes": [
            "B streams in lockstep: each call decodes the same chunk of every stream; per-call times end "
            "with the audio's copy to the host.",
            "audio_s_per_s = B x frames x 0.08 s / median pass time; chunk_ms_* over non-first chunks.",
            "max_abs_vs_whole: the method's audio vs. one whole decode of the same codes (same dtype). "
            "In bf16 it is rounding at different call shapes, amplified by the random decoder (~0.5 for "
            "every method); exactness shows in fp32 (--dtype fp32, which also turns TF32 off).",
        ],
        "results": rows,
    }
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{data['date']}-{card}-stream-codec-{data['commit']}").strip("-")
    path = Path(args.out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B"], help="full-size codec (same for both)")
    p.add_argument("--tiny", metavar="DIR", help="use a tiny checkpoint's speech tokenizer instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--chunks", type=int, nargs="+", default=[12, 25], help="frames per chunk after the first")
    p.add_argument("--first", type=int, default=2, help="frames in the first chunk")
    p.add_argument("--context", type=int, default=25, help="left context frames for redecode")
    p.add_argument("--seconds", type=float, default=10.0, help="audio per stream")
    p.add_argument("--commit", help="the commit to name (default: git's HEAD, '-dirty' if changed)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one untimed pass")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also stream-graph with SnakeBeta fused (stream-graph-snake) and with the step torch.compiled",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="also each graphed method with the decoder's activations and weights channels-last (name-cl)",
    )
    p.add_argument(
        "--no-cudnn-benchmark",
        dest="cudnn_benchmark",
        action="store_false",
        help="leave cuDNN's benchmark mode off (the server turns it on: CodecDecoder)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="of the graphed stream methods (stream-graph[-snake|-compiled][-cl]), time only these",
    )
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if dtype == torch.float32:  # fp32 means fp32: TF32 rounding would hide exactness behind its noise
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    decoder = load_speech_tokenizer(args, device, dtype).model.decoder.eval()
    print(f"{card_name(device)}, torch {torch.__version__}, {dtype}, codec built in {time.perf_counter() - t0:.1f} s")
    streaming = StreamingDecoder(decoder)
    graphed = GraphedDecoder(decoder) if device.type == "cuda" else None
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for chunk in args.chunks:
            for batch in args.batches:
                for result in bench_config(decoder, streaming, graphed, batch, chunk, args, device):
                    rows.append(result.row())
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
                path = write_json(rows, args, device, dtype)  # after every config: a cut-short run keeps its data
                if graphed is not None:
                    graphed.reset()  # this batch's graphs are done: give their memory back
    print("\n" + table(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
