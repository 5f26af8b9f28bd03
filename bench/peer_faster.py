"""The published peer faster-qwen3-tts 0.5.4 on full-size Qwen3-TTS-12Hz models with random weights.

Same models, request lists and report keys as `bench.bench_engines`, so its rows sit beside the reference
and fast engines (engine name `faster-qwen3-tts`). It runs in its own process on the peer's own stack:
faster-qwen3-tts 0.5.4 + qwen-tts-hf 0.1.1.post1 (a transformers-5 fork of upstream that installs itself as
the `qwen_tts` package) on transformers 5.x. The official qwen-tts 0.1.1 (transformers 4.57) must not be on
the path: `qwen_tts` here is the fork, so `bench_engines.build_model` builds the fork's classes.

What the peer is (read off its wheel):
* Loading: `FasterQwen3TTS.from_pretrained(dir_or_hub_id, device="cuda", dtype=bf16, max_seq_len=2048)` runs
  the fork's `Qwen3TTSModel.from_pretrained(dir, device_map=device, torch_dtype=dtype,
  attn_implementation="sdpa")` and wraps the talker and the code predictor in CUDA graphs (transformers
  StaticCache), captured on the first request. It refuses anything but CUDA.
  `--load memory` (default) builds the model in memory as `bench_engines` does and hands it to the peer's
  own `from_pretrained` in place of the fork's disk loader (the peer's graph setup runs unchanged);
  `--load disk` writes a checkpoint in the published layout and loads it through the whole real path (on
  transformers 5.17 the fork cannot load its own codec from disk without `mimi_rope_theta`). Both give
  bit-identical weights and buffers (checked on the tiny model) and the same speed (0.6B on an H100).
* One request at a time: `generate_custom_voice(text, speaker, language, ...)` takes one text, prefills with
  HF, then decodes with batch 1 (a host sync every frame) and decodes the codec once at the end. No batch
  API, no request queue; its `serve` command reads one line at a time. So concurrency c runs the list
  sequentially, FIFO, every request submitted at t0: its time to first audio includes the queue wait.
* Streaming: `generate_custom_voice_streaming(..., chunk_size=12)` yields (audio, sr, timing) every chunk of
  codec frames, decoding the accumulated codes until 25 frames, then a window with 25 frames of left context.
* Exact lengths: its own options. `min_new_tokens` = `max_new_tokens` = N masks EOS for the first N frames
  and stops the loop after N, so every request yields exactly N frames; no hook is needed.

Measured per model: single stream (non-streaming: RTF = audio s / wall s end to end, prompt to float32
audio; streaming: time to first audio chunk, which is the ttff_ms_single reported), then for each
concurrency c the list `mixed_requests(c, low, high)` served as above (`--serve streaming`, default, or
`whole`): aggregate audio s per wall s, p95 time to first audio, peak GPU memory. One full-length warm-up
(non-streaming and streaming) first; the codec is warmed at every length the runs decode.

Local smoke test (CPU, tiny configs; needs a transformers-5 venv with the peer wheels, not the project's):
    PYTHONPATH=. /tmp/peer-venv/bin/python -m bench.peer_faster --tiny --out /tmp/peer.json
On CPU the peer cannot load (CUDA only): its classes are built directly and the two CUDA graphs are
replaced by eager calls of the captured functions, so everything but graph capture and replay runs.

On the lent GPU (repo root as cwd, `.whl` carried). Requests run back to back at ~20 ms a frame, so the
default lists (8 + 32 + 64 requests of ~100 frames) take ~4.5 min per size: one size per call.
    for g in peer common; do pip install -q --no-index --no-deps --target /tmp/site_$g .whl/$g/*.whl; done
    PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site_peer:/tmp/site_common python3 -m bench.peer_faster \\
        --sizes 1.7B --out "$OUT/peer-1.7B.json"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import platform
import shlex
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from bench.bench_engines import (
    MODEL_LABELS,
    SAMPLE_RATE,
    Report,
    Request,
    build_model,
    build_speech_tokenizer,
    dist_version,
    finish_args,
    make_request,
    mixed_requests,
    model_config,
    p95,
    peak_gib,
    results_table,
    speech_tokenizer_config,
    sync_device,
)
from qwen_tts_server.engine.types import SAMPLES_PER_FRAME
from qwen_tts_server.testing import tiny_models

T_START = time.perf_counter()
ENGINE = "faster-qwen3-tts"
STREAM_CONTEXT_FRAMES = 25  # left context the peer's streaming wrappers re-decode once calibrated


# ---------------------------------------------------------------- building and loading the peer


def _as_loaded(base: Any) -> Any:
    """Apply the fork's post-load fix-ups, as its from_pretrained does, to a model built in memory."""
    from qwen_tts._transformers_compat import restore_mimi_full_attention, restore_rope_buffers

    codec = base.model.speech_tokenizer
    restore_rope_buffers(base.model)
    restore_rope_buffers(codec.model)
    restore_mimi_full_attention(codec.model)
    return base


def build_base(size: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The fork's `Qwen3TTSModel` with random weights, as its from_pretrained(dtype=dtype) would give."""
    codec = build_speech_tokenizer(size, device, dtype)
    return _as_loaded(build_model(size, device=device, dtype=dtype, speech_tokenizer=codec))


def _state_as(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in module.state_dict().items()
    }


def write_checkpoint(base: Any, size: str, out: Path) -> Path:
    """The published on-disk layout (bf16 model, fp32 codec, JSON configs, text tokenizer) of `base`."""
    from safetensors.torch import save_file

    (out / "speech_tokenizer").mkdir(parents=True, exist_ok=True)
    save_file(_state_as(base.model, torch.bfloat16), out / "model.safetensors", metadata={"format": "pt"})
    codec = base.model.speech_tokenizer.model
    st_path = out / "speech_tokenizer" / "model.safetensors"
    save_file(_state_as(codec, torch.float32), st_path, metadata={"format": "pt"})
    files: dict[str, Any] = {
        "config.json": model_config(size),
        "generation_config.json": tiny_models.GENERATION_CONFIG,
        "preprocessor_config.json": tiny_models.PREPROCESSOR,
        "speech_tokenizer/config.json": speech_tokenizer_config(size),
        "speech_tokenizer/configuration.json": tiny_models.SPEECH_TOKENIZER_CONFIGURATION,
        "speech_tokenizer/preprocessor_config.json": tiny_models.SPEECH_TOKENIZER_PREPROCESSOR,
    }
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    for name, data in tiny_models.tokenizer_files().items():
        (out / name).write_bytes(data)
    return out


@contextlib.contextmanager
def mimi_rope_theta(fired: list[str]) -> Iterator[None]:
    """Loading the codec from disk fails on transformers 5.17 with qwen-tts-hf 0.1.1.post1: the fork registers
    a 'default' RoPE init that reads `config.rope_theta`, which 5.17's MimiConfig keeps only in
    `rope_parameters`, and from_pretrained re-initialises the rotary buffers through it. Mirror the value
    (as bench_engines does before building the codec) and note each config that needed it in `fired`."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = ROPE_INIT_FUNCTIONS["default"]

    def default(config: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "rope_theta", None) is None:
            config.rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
            fired.append(type(config).__name__)
        return original(config, *args, **kwargs)

    with mock.patch.dict(ROPE_INIT_FUNCTIONS, {"default": default}):
        yield


def _cpu_peer(base: Any, device: torch.device, dtype: torch.dtype, max_seq_len: int) -> Any:
    """CPU smoke test only: the peer's classes wired as its from_pretrained wires them, with each CUDA
    graph replaced by an eager call of the function it would capture (the peer refuses CPU)."""
    from faster_qwen3_tts import FasterQwen3TTS
    from faster_qwen3_tts.predictor_graph import PredictorGraph
    from faster_qwen3_tts.talker_graph import TalkerGraph

    talker = base.model.talker
    config = base.model.config.talker_config
    predictor = PredictorGraph(
        talker.code_predictor,
        talker.code_predictor.model.config,
        config.hidden_size,
        device=str(device),
        dtype=dtype,
        do_sample=True,
        top_k=50,
        temperature=0.9,
    )
    talker_graph = TalkerGraph(talker.model, config, device=str(device), dtype=dtype, max_seq_len=max_seq_len)
    for graph, step in ((predictor, predictor._full_loop), (talker_graph, talker_graph._decode_step)):
        graph._init_cache_layers()
        graph._build_attention_masks()
        graph.graph = types.SimpleNamespace(replay=step)
        graph.captured = True
    tts = FasterQwen3TTS(base, predictor, talker_graph, device=str(device), dtype=dtype, max_seq_len=max_seq_len)
    tts._warmed_up = True
    return tts


@contextlib.contextmanager
def cpu_stand_ins() -> Iterator[None]:
    """CPU smoke test only: the peer's unconditional torch.cuda calls become no-ops."""
    with (
        mock.patch.object(torch.cuda, "synchronize", lambda *_a, **_k: None),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
    ):
        yield


def load_peer(size: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """A `FasterQwen3TTS` over a random full-size (or tiny) model, and how it was loaded."""
    from faster_qwen3_tts import FasterQwen3TTS
    from qwen_tts import Qwen3TTSModel

    device, dtype = torch.device(args.device), args.dtype
    info: dict[str, Any] = {"load": args.load}
    t0 = time.perf_counter()
    base = build_base(size, device, dtype)
    sync_device(device)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    info["params_m"] = round(sum(p.numel() for p in base.model.parameters()) / 1e6, 1)
    peer_kwargs = {
        "device": str(device),
        "dtype": dtype,
        "attn_implementation": "sdpa",
        "max_seq_len": args.max_seq_len,
    }
    with contextlib.ExitStack() as stack:
        source: str = MODEL_LABELS[size]
        if args.load == "disk":
            t1 = time.perf_counter()
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peer-ckpt-")))
            source = str(write_checkpoint(base, size, tmp))
            del base
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            info["write_s"] = round(time.perf_counter() - t1, 1)
        t2 = time.perf_counter()
        fired: list[str] = []
        if args.load == "disk":
            stack.enter_context(mimi_rope_theta(fired))
        if device.type == "cuda":
            if args.load == "memory":
                seen: dict[str, Any] = {}

                def from_memory(name: str, **kwargs: Any) -> Any:
                    seen.update(kwargs)
                    return base

                stack.enter_context(mock.patch.object(Qwen3TTSModel, "from_pretrained", staticmethod(from_memory)))
                tts = FasterQwen3TTS.from_pretrained(source, **peer_kwargs)
                info["loader_kwargs"] = {k: str(v) for k, v in seen.items()}
                if seen.get("torch_dtype") not in (None, dtype) or seen.get("attn_implementation") != "sdpa":
                    raise RuntimeError(f"the peer asked its loader for {seen}, not what was built")
            else:
                tts = FasterQwen3TTS.from_pretrained(source, **peer_kwargs)
        else:
            if args.load == "disk":  # the fork's real loader, with the kwargs the peer passes it
                base = Qwen3TTSModel.from_pretrained(
                    source, device_map=str(device), torch_dtype=dtype, attn_implementation="sdpa"
                )
            tts = _cpu_peer(base, device, dtype, args.max_seq_len)
        sync_device(device)
        info["load_s"] = round(time.perf_counter() - t2, 1)
        if fired:
            info["rope_theta_mirrored"] = sorted(set(fired))
    return tts, info


# ---------------------------------------------------------------- running requests


@dataclasses.dataclass
class PeerRun:
    wall_s: float
    frames: list[int]  # codec frames the peer generated, per request
    samples: list[int]  # audio samples returned, per request
    first_audio_s: list[float]  # per request: t0 (all submitted at once) -> its first audio on the host
    peer_ms_per_step: float  # the peer's own decode-loop timing, averaged over requests

    @property
    def audio_s(self) -> float:
        return sum(self.samples) / SAMPLE_RATE

    def exact(self, requests: Sequence[Request]) -> bool:
        return all(f == r.frames for f, r in zip(self.frames, requests, strict=True))

    def samples_match(self, requests: Sequence[Request]) -> bool:
        return all(s == r.frames * SAMPLES_PER_FRAME for s, r in zip(self.samples, requests, strict=True))


class Spy:
    """Wraps the peer's two generation loops (looked up at call time) to read frames and its own timing."""

    def __init__(self) -> None:
        import faster_qwen3_tts.generate as gen
        import faster_qwen3_tts.streaming as stream

        self.frames = 0
        self.ms_per_step: list[float] = []
        self._patches = [
            mock.patch.object(gen, "fast_generate", self._whole(gen.fast_generate)),
            mock.patch.object(stream, "fast_generate_streaming", self._streamed(stream.fast_generate_streaming)),
        ]
        for patch in self._patches:
            patch.start()

    def _whole(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any, **kwargs: Any) -> Any:
            codes, timing = fn(*args, **kwargs)
            self.frames = 0 if codes is None else int(codes.shape[0])
            self.ms_per_step.append(float(timing["ms_per_step"]))
            return codes, timing

        return spy

    def _streamed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def spy(*args: Any, **kwargs: Any) -> Iterator[Any]:
            self.frames = 0
            decode_ms = 0.0
            for chunk, timing in fn(*args, **kwargs):
                self.frames += int(chunk.shape[0])
                decode_ms += float(timing["decode_ms"])
                yield chunk, timing
            self.ms_per_step.append(decode_ms / max(self.frames, 1))

        return spy

    def close(self) -> None:
        for patch in self._patches:
            patch.stop()


class PeerBench:
    """Serves request lists through the peer one request at a time, as it can."""

    def __init__(self, tts: Any, device: torch.device, chunk_size: int) -> None:
        self.tts = tts
        self.device = device
        self.chunk_size = chunk_size
        self.spy = Spy()

    def _one(self, request: Request, streaming: bool) -> tuple[int, float]:
        """Returns (audio samples, perf_counter at first audio)."""
        kwargs = {
            "text": request.text,
            "speaker": request.speaker,
            "language": request.language,
            "max_new_tokens": request.frames,
            "min_new_tokens": request.frames,
        }
        if not streaming:
            wavs, _sr = self.tts.generate_custom_voice(**kwargs)
            return int(np.asarray(wavs[0]).size), time.perf_counter()
        samples, first = 0, None
        for audio, _sr, _timing in self.tts.generate_custom_voice_streaming(**kwargs, chunk_size=self.chunk_size):
            if first is None:
                first = time.perf_counter()
            samples += int(np.asarray(audio).size)
        return samples, first if first is not None else time.perf_counter()

    def run(self, requests: Sequence[Request], *, streaming: bool) -> PeerRun:
        frames, samples, first_audio = [], [], []
        self.spy.ms_per_step.clear()
        sync_device(self.device)
        t0 = time.perf_counter()
        for i, request in enumerate(requests):
            torch.manual_seed(1000 + i)
            n, first = self._one(request, streaming)
            frames.append(self.spy.frames)
            samples.append(n)
            first_audio.append(first - t0)
        wall = time.perf_counter() - t0
        return PeerRun(
            wall_s=wall,
            frames=frames,
            samples=samples,
            first_audio_s=first_audio,
            peer_ms_per_step=float(np.mean(self.spy.ms_per_step)) if self.spy.ms_per_step else 0.0,
        )

    def close(self) -> None:
        self.spy.close()


def streamed_decode_lengths(frames: int, chunk: int) -> set[int]:
    """Code lengths the peer's streaming wrapper hands the codec for one request (from its schedule:
    accumulated codes until >= max(25, chunk) frames, then each chunk with 25 frames of left context)."""
    lengths: set[int] = set()
    total, calibrated = 0, False
    while total < frames:
        new = min(chunk, frames - total)
        total += new
        lengths.add(total if not calibrated else min(total, new + STREAM_CONTEXT_FRAMES))
        calibrated = calibrated or total >= max(STREAM_CONTEXT_FRAMES, chunk)
    return lengths


@torch.inference_mode()
def warm_codec(tts: Any, lengths: set[int], device: torch.device) -> float:
    """Decode random codes once at every length the runs decode (batch 1, the peer's call shape): the first
    decode at a new length costs 0.3-1.4 s on the GPU, which no timed section should pay. Returns seconds."""
    codec = tts.model.model.speech_tokenizer
    t0 = time.perf_counter()
    for n in sorted(lengths):
        codec.decode({"audio_codes": torch.randint(0, 2048, (1, n, 16), device=device)})
    sync_device(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- report


class PeerReport:
    """The same JSON shape as bench_engines' report (results -> engine -> model label -> entry)."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        import transformers

        started = datetime.datetime.now(datetime.timezone.utc)
        self.concurrency: list[int] = args.concurrency
        self.out: Path | None = Path(args.out) if args.out else None
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
        serving = f"streaming, chunk_size {args.chunk_size}" if args.serve == "streaming" else "whole (no streaming)"
        self.data: dict[str, Any] = {
            "card": card,
            "date": started.strftime("%Y-%m-%d"),
            "started_at": started.isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, "-m", "bench.peer_faster", *sys.argv[1:]]),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": transformers.__version__,
                "faster_qwen3_tts": dist_version("faster-qwen3-tts"),
                "qwen_tts_hf": dist_version("qwen-tts-hf"),
            },
            "settings": {
                "device": str(device),
                "dtype": str(args.dtype).removeprefix("torch."),
                "frames_single": args.single_frames,
                "frames_range": [args.low, args.high],
                "concurrency": args.concurrency,
                "budget_s": args.budget_s,
                "load": args.load,
                "serve": args.serve,
                "chunk_size": args.chunk_size,
                "max_seq_len": args.max_seq_len,
                "weights": "random: linear/embedding N(0, 0.02), conv N(0, 1/fan_in), norms 1",
                "sampling": "peer defaults (top_k 50, top_p 1.0, temperature 0.9, repetition_penalty 1.05; "
                "code predictor do_sample, top_k 50, temperature 0.9 fixed in its graph)",
            },
            "results": {ENGINE: {}},
            "checks": {},
            "notes": [
                "End to end per request: prompt building, all frames, codec decode to float32 audio on the host.",
                "EOS method: the peer's own min_new_tokens = max_new_tokens = target frames "
                "(frames counted from the codes its generation loop returns).",
                "The peer serves one request at a time (batch 1, no batch API): a concurrency-c list runs "
                f"sequentially in order, all submitted at t0 ({serving}); ttff_ms_p95_c* is t0 -> first audio, "
                "queue wait included, and audio_s_per_s_c* is total audio / total wall.",
                "ttff_ms_single: first audio chunk of a streaming request (generate_custom_voice_streaming, "
                f"chunk_size {args.chunk_size}); xrt_single: a non-streaming request (generate_custom_voice).",
                "runs.*.ms_per_step = wall / total frames (one frame per step, requests back to back); "
                "peer_ms_per_step = the peer's own decode-loop timing per frame.",
                "Text tokenizer: tiny_models' (published special ids, tiny BPE), as bench_engines uses.",
            ],
            "models": {},
        }
        if device.type != "cuda":
            self.data["notes"].append(
                "CPU smoke test: the peer refuses CPU; its classes were wired directly and each CUDA graph "
                "replaced by an eager call of the function it captures. Not a measurement of the peer."
            )

    def entry(self, label: str) -> dict[str, Any]:
        """bench_engines' Report.entry, so the keys always match its engine entries."""
        shim = types.SimpleNamespace(data=self.data, concurrency=self.concurrency)
        return Report.entry(shim, ENGINE, label)  # type: ignore[arg-type]

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - T_START:7.1f}s] {message}", flush=True)

    def save(self) -> None:
        if self.out is None:
            return
        self.data["elapsed_s"] = round(time.perf_counter() - T_START, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.out)

    def table(self) -> str:
        return results_table({ENGINE: self.data["results"][ENGINE]}, self.concurrency)


# ---------------------------------------------------------------- the sweep


class Budget:
    """Wall-clock budget from process start; a section whose estimate would overrun it is skipped."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.frame_s: float | None = None  # latest wall seconds per generated frame, requests back to back

    @property
    def left_s(self) -> float:
        return self.limit_s - (time.perf_counter() - T_START)

    def estimate(self, requests: Sequence[Request]) -> float:
        per_frame = 0.05 if self.frame_s is None else self.frame_s
        return 1.15 * per_frame * sum(r.frames for r in requests) + 0.05 * len(requests) + 2.0


def bench_size(size: str, args: argparse.Namespace, report: PeerReport, budget: Budget) -> None:
    device = torch.device(args.device)
    label = MODEL_LABELS[size]
    entry = report.entry(label)
    tts, info = load_peer(size, args)
    report.data["models"][label] = info
    report.log(f"loaded {label} into {ENGINE} ({args.load}): {info}")
    bench = PeerBench(tts, device, args.chunk_size)
    streaming_runs = args.serve == "streaming"
    lists = {f"c{c}": mixed_requests(c, args.low, args.high) for c in args.concurrency}
    single = [make_request(0, args.single_frames)]
    lengths = {args.single_frames} | streamed_decode_lengths(args.single_frames, args.chunk_size)
    for requests in lists.values():
        for r in requests:
            lengths |= streamed_decode_lengths(r.frames, args.chunk_size) if streaming_runs else {r.frames}
    seconds = warm_codec(tts, lengths, device)
    report.data.setdefault("codec_warmup_s", {})[label] = round(seconds, 1)
    report.log(f"codec warm-up over {len(lengths)} lengths: {seconds:.1f} s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def section(key: str, requests: list[Request], *, streaming: bool) -> PeerRun | None:
        estimate = budget.estimate(requests)
        if estimate > budget.left_s:
            entry["skipped"].append(f"{key}: needs ~{estimate:.0f} s, {budget.left_s:.0f} s left")
            report.log(f"{label} {key}: skipped (needs ~{estimate:.0f} s, {budget.left_s:.0f} s left)")
            report.save()
            return None
        try:
            result = bench.run(requests, streaming=streaming)
        except Exception as exc:  # e.g. out of memory: record it, keep the other sections' data
            entry["errors"][key] = f"{type(exc).__name__}: {exc}"[:500]
            report.log(f"{label} {key}: FAILED {type(exc).__name__}: {exc}")
            report.save()
            return None
        frames = sum(result.frames)
        frame_s = result.wall_s / max(frames, 1)
        budget.frame_s = frame_s if key.startswith("warmup") else max(budget.frame_s or 0.0, frame_s)
        exact = result.exact(requests)
        entry["frames_exact"] = entry["frames_exact"] and exact
        entry["runs"][key] = {
            "requests": len(requests),
            "frames": frames,
            "audio_s": round(result.audio_s, 2),
            "wall_s": round(result.wall_s, 3),
            "ms_per_step": round(1000 * frame_s, 1),
            "peer_ms_per_step": round(result.peer_ms_per_step, 1),
            "exact_lengths": exact,
            "samples_match_frames": result.samples_match(requests),
            "serving": "sequential " + ("streaming" if streaming else "whole"),
            "first_audio_ms_p50": round(1000 * float(np.median(result.first_audio_s)), 1),
            "first_audio_ms_p95": round(1000 * p95(result.first_audio_s), 1),
        }
        report.log(
            f"{label} {key}: {len(requests)} req, {result.audio_s:.1f} audio s in {result.wall_s:.2f} s "
            f"({result.audio_s / result.wall_s:.2f} audio-s/s, {1000 * frame_s:.1f} ms/frame, peer's own "
            f"{result.peer_ms_per_step:.1f}, first audio p95 {1000 * p95(result.first_audio_s):.0f} ms, "
            f"exact={exact})"
        )
        return result

    try:
        if section("warmup", single, streaming=False) is None:
            entry["skipped"].append("all: no time left for the warm-up")
            return
        section("warmup_streaming", single, streaming=True)
        result = section("single", single, streaming=False)
        if result is not None:
            entry["xrt_single"] = round(result.audio_s / result.wall_s, 3)
        result = section("single_streaming", single, streaming=True)
        if result is not None:
            entry["ttff_ms_single"] = round(1000 * result.first_audio_s[0], 1)
        entry["peak_gib"] = peak_gib(device)
        report.save()
        for c in args.concurrency:
            result = section(f"c{c}", lists[f"c{c}"], streaming=streaming_runs)
            if result is not None:
                entry[f"audio_s_per_s_c{c}"] = round(result.audio_s / result.wall_s, 2)
                entry[f"ttff_ms_p95_c{c}"] = round(1000 * p95(result.first_audio_s), 1)
            entry["peak_gib"] = peak_gib(device)
            report.save()
    finally:
        bench.close()
        entry["peak_gib"] = peak_gib(device)
        report.save()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma list of 1.7B,0.6B (default both; --tiny: tiny)")
    p.add_argument("--single-frames", type=int, default=None, help="single-stream frames (default 100; --tiny: 30)")
    p.add_argument("--concurrency", default=None, help="comma list (default 8,32,64; --tiny: 2,4)")
    p.add_argument("--low", type=int, default=None, help="shortest mixed request, frames (default 50; --tiny: 6)")
    p.add_argument("--high", type=int, default=None, help="longest mixed request, frames (default 150; --tiny: 30)")
    p.add_argument("--serve", choices=("streaming", "whole"), default="streaming", help="how lists are served")
    p.add_argument("--chunk-size", type=int, default=None, help="streaming chunk, frames (default 12, the peer's)")
    p.add_argument("--load", choices=("memory", "disk"), default="memory", help="hand the model over, or a checkpoint")
    p.add_argument("--max-seq-len", type=int, default=2048, help="the peer's static KV length (its CLI's 2048)")
    p.add_argument("--budget-s", type=float, default=None, help="wall budget from start (default 540; --tiny: 300)")
    p.add_argument("--tiny", action="store_true", help="tiny configs and counts: a CPU smoke test")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu (--tiny: cpu)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default bfloat16 on cuda, else float32)")
    p.add_argument("--out", default=None, help="write the results to this JSON file (after every section)")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "sizes": "tiny" if tiny else "1.7B,0.6B",
        "concurrency": "2,4" if tiny else "8,32,64",
        "single_frames": 30 if tiny else 100,
        "low": 6 if tiny else 50,
        "high": 30 if tiny else 150,
        "chunk_size": 4 if tiny else 12,
        "budget_s": 300.0 if tiny else 540.0,
        "device": "cuda" if torch.cuda.is_available() and not tiny else "cpu",
    }
    finish_args(p, args, defaults)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import transformers

    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = str(device)
    report = PeerReport(args, device)
    budget = Budget(args.budget_s)
    report.log(f"{report.data['card']}, torch {torch.__version__}, {args.dtype}, sizes {args.sizes}, {ENGINE}")
    with contextlib.ExitStack() as stack:
        if device.type != "cuda":
            stack.enter_context(cpu_stand_ins())
        for size in args.sizes:
            if budget.left_s < 60.0 and size != "tiny":
                report.entry(MODEL_LABELS[size])["skipped"].append(f"all: {budget.left_s:.0f} s left")
                report.log(f"{size}: skipped, {budget.left_s:.0f} s left")
                report.save()
                continue
            try:
                bench_size(size, args, report, budget)
            except Exception as exc:  # a failed load: record it and go on to the next size
                report.entry(MODEL_LABELS[size])["errors"]["load"] = f"{type(exc).__name__}: {exc}"[:500]
                report.log(f"{size}: FAILED {type(exc).__name__}: {exc}")
                traceback.print_exc()
                report.save()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report.save()
    print("\n" + report.table(), flush=True)
    if report.out is not None:
        print(f"wrote {report.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
