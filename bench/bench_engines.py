"""Upstream reference vs. our fast engine on full-size Qwen3-TTS-12Hz models with random weights.

Builds each model in memory (published hyper-parameters, random weights, bf16 on the target device,
no checkpoint files, no network) and measures, on the same card in one process:

* upstream `qwen-tts` generate, called exactly as our `ReferenceRunner` calls it (one padded batch,
  `max_new_tokens` = frames + 1; `engine.reference` itself is not imported, since its registry import
  pulls in pydantic-settings, which the GPU image lacks);
* our `FastEngine` on its own thread, fed `Sequence`s, as `FastRuntime` does.

Per engine and model: single-stream real-time factor and time to first frame, aggregate audio
seconds per wall second at several concurrencies (mixed lengths, same list for both engines, codec
decode included) with their p95 time to first frame, peak GPU memory, and a greedy parity check (fast
vs. reference codes). Every engine first runs one full-length warm-up request; the codec is warmed at
every length and batch shape the runs decode. Sections that would overrun `--budget-s` are skipped
(and listed). Prints a table; `--out DIR` writes `DIR/<date>-<card>.json` and `.md`, rewritten after
every section so a run cut short still leaves its data.

Exact lengths: random weights rarely emit EOS, so every request is held to exactly its target frames
in both engines. Fast engine: `max_frames` = `min_frames` = target (EOS masked until then).
Reference: a forward hook on
`talker.codec_head` (as `testing.force_eos`, but without host syncs, so it adds no stall to
upstream's loop) masks EOS until row i's call `frames[i]` and forces it there.

Local smoke test (CPU, tiny configs, ~10 s):
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_engines --tiny --out /tmp/bench

The published peer faster-qwen3-tts runs too (`bench.peer_faster`, in a child process on its own
stack; its rows are named `faster-qwen3-tts`). It serves one request at a time, so it takes ~4 min per
model; with the reference that is about 9 min per model: on the lent GPU (10 min a command) run one
size per call, on the same warm machine.

On the lent GPU (repo root as cwd, `.whl` from shared/tools/device-wheels/fetch.sh carried):
    for g in official common peer; do pip install -q --no-index --no-deps --target /tmp/site_$g .whl/$g/*.whl; done
    PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site_official:/tmp/site_common \
        python3 -m bench.bench_engines --sizes 1.7B --budget-s 570 --out "$OUT"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import queue
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.tables import markdown_table
from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.memory import WORKSPACE_BYTES, auto_slots, row_bytes
from qwen_tts_server.engine.fast.prompt import prompt_for_item
from qwen_tts_server.engine.fast.runtime import resolve_sampling
from qwen_tts_server.engine.fast.sampler import SamplingPlan
from qwen_tts_server.engine.fast.sequence import Sequence as FastSequence
from qwen_tts_server.engine.types import SAMPLES_PER_FRAME, Mode, SamplingParams, SynthesisItem
from qwen_tts_server.testing import tiny_models

T_START = time.perf_counter()
SAMPLE_RATE = 24000
FRAME_S = SAMPLES_PER_FRAME / SAMPLE_RATE  # 0.08 s of audio per codec frame
STD = 0.02  # N(0, STD) for every linear and embedding weight, as HF's initializer_range

Size = str  # "1.7B" | "0.6B" | "tiny"
MODEL_LABELS: dict[Size, str] = {
    "1.7B": "Qwen3-TTS-12Hz-1.7B-CustomVoice",
    "0.6B": "Qwen3-TTS-12Hz-0.6B-CustomVoice",
    "tiny": "tiny-CustomVoice",
}
_KIND_SUFFIX = {"custom_voice": "CustomVoice", "voice_design": "VoiceDesign", "base": "Base"}

# ---------------------------------------------------------------- published hyper-parameters

TALKER_BY_SIZE: dict[Size, dict[str, int]] = {
    "1.7B": {"hidden_size": 2048, "intermediate_size": 6144},
    "0.6B": {"hidden_size": 1024, "intermediate_size": 3072},
}
TALKER: dict[str, Any] = {
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "text_hidden_size": 2048,
    "rope_theta": 1000000,
    "max_position_embeddings": 32768,
    "rope_scaling": {"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default", "type": "default"},
}
CODE_PREDICTOR: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 5,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
SPEAKER_ENCODER: dict[str, Any] = {  # base checkpoints only; enc_dim = talker hidden size
    "enc_channels": [512, 512, 512, 512, 1536],
    "enc_attention_channels": 128,
    "enc_res2net_scale": 8,
    "enc_se_channels": 128,
}
# Qwen3-TTS-Tokenizer-12Hz: Mimi encoder (39.4M) and codec decoder (114.3M), 153.7M in all.
CODEC_ENCODER: dict[str, Any] = {
    "hidden_size": 512,
    "num_filters": 64,
    "num_hidden_layers": 8,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "codebook_dim": 256,
    "vector_quantization_hidden_dimension": 256,
    "num_quantizers": 32,
    "upsample_groups": 512,
    "sliding_window": 250,
}
CODEC_DECODER: dict[str, Any] = {
    "codebook_dim": 512,
    "latent_dim": 1024,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 64,
    "decoder_dim": 1536,
    "sliding_window": 72,
    "upsample_rates": [8, 5, 4, 3],
    "upsampling_ratios": [2, 2],
}


def published_name(size: Size, kind: str = "custom_voice") -> str:
    name = f"Qwen3-TTS-12Hz-{'1.7B' if size == 'tiny' else size}-{_KIND_SUFFIX[kind]}"
    if name not in tiny_models.PUBLISHED_MODELS:
        raise ValueError(f"no published {kind} model of size {size}")
    return name


def model_config(size: Size, kind: str = "custom_voice") -> dict[str, Any]:
    """config.json of the published model (tables, special ids) at full size, or tiny_models' tiny one."""
    config = tiny_models.model_config(published_name(size, kind))
    if size == "tiny":
        return config
    talker = config["talker_config"]
    talker.update(json.loads(json.dumps(TALKER)), **TALKER_BY_SIZE[size])
    talker["code_predictor_config"].update(CODE_PREDICTOR)
    config["speaker_encoder_config"].update(SPEAKER_ENCODER, enc_dim=talker["hidden_size"])
    return config


def speech_tokenizer_config(size: Size) -> dict[str, Any]:
    config = tiny_models.speech_tokenizer_config()
    if size != "tiny":
        config["encoder_config"].update(CODEC_ENCODER)
        config["decoder_config"].update(CODEC_DECODER)
    return config


# ---------------------------------------------------------------- building models in memory


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    """HF's switch that skips weight init at construction (moved between transformers versions)."""
    for module_name in ("transformers.modeling_utils", "transformers.initialization"):
        with contextlib.suppress(ImportError, AttributeError):
            module = __import__(module_name, fromlist=["no_init_weights"])
            return module.no_init_weights()
    return contextlib.nullcontext()


@contextlib.contextmanager
def fast_construction(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules are allocated on `device` in `dtype` (buffers that ask for fp32 keep it, as with
    from_pretrained(dtype=...)) and left uninitialised; `randomize` fills them afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init_weights(), device:
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def randomize(module: nn.Module) -> None:
    """Fill every weight that construction left uninitialised.

    Linear and embedding weights N(0, 0.02) (HF's initializer_range), convolutions N(0, 1/fan_in)
    (variance-preserving, so the codec's activations stay in range), biases 0, LayerNorm 1/0.
    Everything else (RMSNorm and layer-scale weights, Snake parameters, codebook usage counts,
    rotary tables) is set by its constructor, without HF's init, and is kept, except the codec's
    codebooks, which are drawn N(0, 1) so different codes decode differently.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            sub.weight.normal_(0.0, STD)
        elif isinstance(sub, (nn.Conv1d, nn.ConvTranspose1d)):
            w = sub.weight
            fan_in = w.shape[1] * w.shape[2] if isinstance(sub, nn.Conv1d) else w.shape[0] * w.shape[2]
            w.normal_(0.0, fan_in**-0.5)
        elif isinstance(sub, (nn.LayerNorm, nn.GroupNorm)):
            if sub.weight is not None:
                sub.weight.fill_(1.0)
        else:
            continue
        bias = getattr(sub, "bias", None)
        if isinstance(bias, Tensor):
            bias.zero_()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.endswith(("embedding_sum", "embed_sum")):
            tensor.normal_()
    bad = [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise RuntimeError(f"non-finite weights after randomize: {bad[:5]}")


def build_speech_tokenizer(size: Size, device: torch.device, dtype: torch.dtype, seed: int = 1) -> Any:
    """`qwen_tts.Qwen3TTSTokenizer` around a random 12 Hz codec, set up as its from_pretrained does."""
    from qwen_tts import Qwen3TTSTokenizer
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model
    from transformers import EncodecFeatureExtractor

    config = Qwen3TTSTokenizerV2Config(**speech_tokenizer_config(size))
    encoder = config.encoder_config
    if getattr(encoder, "rope_theta", None) is None:  # transformers 5.x keeps it in rope_parameters only
        encoder.rope_theta = (getattr(encoder, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    torch.manual_seed(seed)
    with fast_construction(device, dtype):
        model = Qwen3TTSTokenizerV2Model(config)
    randomize(model)
    model.eval()
    wrapper = Qwen3TTSTokenizer()
    wrapper.model = model
    wrapper.config = model.config
    wrapper.device = device
    wrapper.feature_extractor = EncodecFeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, return_attention_mask=True
    )
    return wrapper


def build_processor() -> Any:
    """Upstream's Qwen3TTSProcessor over tiny_models' text tokenizer (published special ids and
    vocabulary size), loaded the way from_pretrained loads it; the files live only for the load."""
    from qwen_tts.core.models import Qwen3TTSProcessor

    with tempfile.TemporaryDirectory(prefix="qtts-bench-tok-") as tmp:
        for file_name, data in tiny_models.tokenizer_files().items():
            (Path(tmp) / file_name).write_bytes(data)
        preprocessor = {"processor_class": "Qwen3TTSProcessor", "padding_side": "left"}
        (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(preprocessor))
        return Qwen3TTSProcessor.from_pretrained(tmp, fix_mistral_regex=True)


def build_model(
    size: Size,
    kind: str = "custom_voice",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    *,
    seed: int = 0,
    speech_tokenizer: Any | None = None,
) -> Any:
    """A `qwen_tts.Qwen3TTSModel` with random weights, equivalent to `from_pretrained(dir, dtype=dtype,
    attn_implementation="sdpa")` of a published checkpoint. Pass `speech_tokenizer` to share one codec
    (the same for every published model) between builds."""
    from qwen_tts import Qwen3TTSModel
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    device = torch.device(device)
    config = Qwen3TTSConfig(**model_config(size, kind))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with fast_construction(device, dtype):
        model = Qwen3TTSForConditionalGeneration(config)
    randomize(model)
    model.eval()
    model.load_speech_tokenizer(speech_tokenizer or build_speech_tokenizer(size, device, dtype, seed + 1))
    model.load_generate_config(dict(tiny_models.GENERATION_CONFIG))
    return Qwen3TTSModel(model=model, processor=build_processor(), generate_defaults=model.generate_config)


# ---------------------------------------------------------------- requests

SPEAKERS = ("vivian", "serena", "uncle_fu", "ryan", "aiden", "ono_anna", "sohee", "eric", "dylan")
_TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. Please read this sentence "
    "aloud: the weather today is sunny, and tomorrow it may rain again. The quick brown fox jumps over the "
    "lazy dog. We will speak slowly and calmly, with a warm, deep and happy voice. What time is it? Where "
    "are you going? How much does it cost? Thank you very much, see you soon. A young woman with a clear, "
    "bright voice; an old man who speaks in a low and gentle tone."
)
_WORDS = tuple(_TEXT.split())


@dataclasses.dataclass(frozen=True)
class Request:
    text: str
    speaker: str
    frames: int  # exact number of codec frames to produce (0.08 s each)
    language: str = "english"

    @property
    def item(self) -> SynthesisItem:
        return SynthesisItem(text=self.text, language=self.language, speaker=self.speaker)


def make_request(index: int, frames: int) -> Request:
    """About one word per 4 frames (~3 words a second of audio), so prompts grow with the audio."""
    words = max(3, round(frames / 4))
    start = (index * 7) % len(_WORDS)
    text = " ".join(_WORDS[(start + j) % len(_WORDS)] for j in range(words)).rstrip(",;:") + "."
    return Request(text=text[0].upper() + text[1:], speaker=SPEAKERS[index % len(SPEAKERS)], frames=frames)


def mixed_requests(count: int, low: int, high: int) -> list[Request]:
    """`count` requests with lengths spread evenly over low..high frames, in a fixed shuffled order."""
    frames = [low if count == 1 else round(low + i * (high - low) / (count - 1)) for i in range(count)]
    random.Random(count).shuffle(frames)
    return [make_request(i, f) for i, f in enumerate(frames)]


# ---------------------------------------------------------------- running the engines


@dataclasses.dataclass
class RunResult:
    wall_s: float
    frames: list[int]  # produced per request
    samples: list[int]  # audio samples per request
    ttff_s: list[float]  # per request: submit -> first frame available to the caller
    codes: list[Tensor] | None = None  # [frames, 16] per request, when asked for
    seconds: dict[str, float] | None = None  # fast engine: host seconds per loop part during the run
    ttff_parts_ms: dict[str, float] | None = None  # fast engine: p95 of each part of the first-frame wait
    batch_sizes: list[int] | None = None  # fast engine: running requests at each step of the run, in order

    @property
    def audio_s(self) -> float:
        return sum(self.samples) / SAMPLE_RATE

    def exact(self, requests: Sequence[Request]) -> bool:
        return all(
            f == r.frames and s == r.frames * SAMPLES_PER_FRAME
            for f, s, r in zip(self.frames, self.samples, requests, strict=True)
        )


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Tracker:
    """One fast-engine request seen from the caller's side (callbacks run on the engine thread)."""

    def __init__(self) -> None:
        self.submitted = 0.0
        self.first_frame: float | None = None
        self.finished = 0.0
        self.done = threading.Event()
        self.seq: FastSequence | None = None
        self.done_hook: Callable[[], None] | None = None

    def on_frame(self, _seq: FastSequence, _frame: Tensor) -> None:
        if self.first_frame is None:
            self.first_frame = time.perf_counter()

    def on_finish(self, seq: FastSequence) -> None:
        self.seq = seq
        self.finished = time.perf_counter()
        self.done.set()
        if self.done_hook is not None:
            self.done_hook()


class FastBench:
    """A started FastEngine plus the per-request options the bench gives it."""

    def __init__(self, tts: Any, *, max_slots: int, max_len: int, compile: bool) -> None:
        self.tts = tts
        self.engine = FastEngine(
            tts,
            max_slots=max_slots,
            max_len=max_len,
            admit_wait_s=0.04,  # the server's defaults (QTTS_ADMIT_WAIT_MS, QTTS_CODEC_WAIT_MS)
            codec_wait_s=0.1,
            compile=compile,
        )
        # Compile, and capture the frame graphs of every bucket for the benchmark's sampling, up front.
        t0 = time.perf_counter()
        self.engine.warm_up()
        self.warm_up_s = time.perf_counter() - t0
        self.engine.start()

    eos_method = "fast: SequenceSampling.min_frames = max_frames = target"

    def run(
        self,
        requests: Sequence[Request],
        *,
        greedy: bool = False,
        graphs: bool = True,
        together: bool = False,
        timeout_s: float = 600.0,
    ) -> RunResult:
        """`graphs=False` runs the same engine (same buckets, same state) without replaying graphs.

        Requests arrive one by one, each after its prompt is built, as a server's would: a running engine
        often admits the first alone and the rest when its admission wait says, so the step-by-step
        batches depend on timing. `together=True` holds the engine until all are submitted: one batch from
        the first step on, the same batches in every run (needed wherever runs' codes are compared:
        in bf16 a request's numbers depend on the batch it runs in)."""
        device = self.engine.runner.device
        trackers = [_Tracker() for _ in requests]
        options = SamplingParams(do_sample=False, subtalker_do_sample=False) if greedy else None
        sync_device(device)
        before = dict(self.engine.seconds)
        codec_frames = self.engine.codec_frames
        saved_graphs = self.engine.graphs
        batch_sizes: list[int] = []
        # Both read by the engine thread at each step; it is idle now (no requests).
        self.engine.on_step = batch_sizes.append
        if not graphs:
            self.engine.graphs = None
        t0 = time.perf_counter()
        try:
            with self._held() if together else contextlib.nullcontext():
                for i, (request, tracker) in enumerate(zip(requests, trackers, strict=True)):
                    self._submit(i, request, tracker, options)
            for tracker in trackers:
                if not tracker.done.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - t0))):
                    raise TimeoutError(f"fast engine: requests unfinished after {timeout_s:.0f} s")
        finally:
            self.engine.graphs = saved_graphs
            self.engine.on_step = None
        seqs = [t.seq for t in trackers]
        for seq in seqs:
            if seq is not None and seq.error is not None:
                raise RuntimeError("fast engine request failed") from seq.error

        def p95_ms(parts: list[float]) -> float:
            return round(1000 * p95(parts), 1)

        ttff_parts = {
            "prompt": p95_ms([s.submitted_at - t.submitted for s, t in zip(seqs, trackers, strict=True)]),
            "queue": p95_ms([s.admitted_at - s.submitted_at for s in seqs]),
            "prefill_and_first_step": p95_ms([s.first_frame_at - s.admitted_at for s in seqs]),
        }
        return RunResult(
            ttff_parts_ms=ttff_parts,
            wall_s=max(t.finished for t in trackers) - t0,
            frames=[s.num_frames for s in seqs],
            samples=[0 if s.audio is None else int(np.asarray(s.audio).size) for s in seqs],
            ttff_s=[(t.first_frame or t.finished) - t.submitted for t in trackers],
            codes=[torch.stack(s.frames) for s in seqs],
            batch_sizes=batch_sizes,
            seconds={
                **{k: round(v - before[k], 2) for k, v in self.engine.seconds.items()},
                "codec_audio_s": round((self.engine.codec_frames - codec_frames) * FRAME_S, 1),
            },
        )

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """The engine thread takes no step inside this block (a step that starts waits at its top, before
        it empties the inbox), so everything submitted here reaches the scheduler in one step; with
        nothing running, the scheduler admits it all at once (within `max_slots` and the prefill budget).
        Only for an idle engine: a step already past its inbox would not wait."""
        engine = self.engine
        released = threading.Event()
        step = engine.step

        def held_step() -> list[FastSequence]:
            released.wait()
            return step()

        engine.step = held_step  # type: ignore[method-assign]  # the loop looks `step` up at each call
        try:
            yield
        finally:
            del engine.step
            released.set()

    def _submit(self, i: int, request: Request, tracker: _Tracker, options: SamplingParams | None) -> None:
        tracker.submitted = time.perf_counter()
        sampling = resolve_sampling(options or SamplingParams(seed=1000 + i), self.tts.generate_defaults or {})
        sampling = dataclasses.replace(sampling, min_frames=request.frames)
        seq = FastSequence(
            prompt=prompt_for_item(self.tts, Mode.CUSTOM_VOICE, request.item),
            sampling=sampling,
            max_frames=request.frames,
            on_frame=tracker.on_frame,
            on_finish=tracker.on_finish,
        )
        self.engine.submit(seq)

    def run_sustained(self, requests: Sequence[Request], clients: int, timeout_s: float = 600.0) -> dict[str, Any]:
        """Closed loop: `clients` requests in flight at all times (each finish submits the next one).

        Unlike `run`, whose batch drains to one request at the end, this measures the rate a server
        sustains at that concurrency: audio of the requests that finished between the first finish
        and the last submission, over that interval (end to end: decoded audio).
        """
        trackers = [_Tracker() for _ in requests]
        before = dict(self.engine.seconds)
        finished: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i, tracker in enumerate(trackers):
            tracker.done_hook = lambda i=i: finished.put(i)
        t0 = time.perf_counter()
        submitted = 0
        for _ in range(min(clients, len(requests))):
            self._submit(submitted, requests[submitted], trackers[submitted], None)
            submitted += 1
        last_submit = time.perf_counter()
        for _ in range(len(requests)):
            finished.get(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
            if submitted < len(requests):
                self._submit(submitted, requests[submitted], trackers[submitted], None)
                submitted += 1
                last_submit = time.perf_counter()
        first_finish = min(t.finished for t in trackers)
        window = [t for t in trackers if first_finish <= t.finished <= last_submit and t.seq is not None]
        audio_s = sum(0 if t.seq.audio is None else np.asarray(t.seq.audio).size for t in window) / SAMPLE_RATE
        return {
            "clients": clients,
            "requests": len(requests),
            "wall_s": round(max(t.finished for t in trackers) - t0, 2),
            "window_s": round(last_submit - first_finish, 2),
            "window_requests": len(window),
            "audio_s_per_s": round(audio_s / max(last_submit - first_finish, 1e-9), 1),
            "ttff_ms_p95": round(1000 * p95([(t.first_frame or t.finished) - t.submitted for t in trackers]), 1),
            "engine_seconds": {k: round(v - before[k], 2) for k, v in self.engine.seconds.items()},
        }

    def close(self) -> None:
        self.engine.stop()


class ExactLengths:
    """Forward hook on upstream's `talker.codec_head`: batch row i yields exactly `lengths[i]` frames.

    Call 0 is the prefill (more than one position; it restarts the count). Before row i's call
    `lengths[i]` its EOS logit is -1e4; from that call on every logit is -1e4 but EOS, +1e4, so greedy
    and sampled decoding both stop there. All on the device: no host sync is added to upstream's loop.
    """

    def __init__(self, lengths: Sequence[int], eos_id: int, device: torch.device) -> None:
        self.due_at = torch.tensor(list(lengths), device=device)[:, None]
        self.eos = torch.tensor([eos_id], device=device)
        self.calls = 0

    def __call__(self, _module: nn.Module, _inputs: Any, logits: Tensor) -> Tensor:
        if logits.shape[1] > 1:
            self.calls = 0
        last = logits[:, -1]
        blocked = last.index_fill(1, self.eos, -1e4)
        forced = torch.full_like(last, -1e4).index_fill(1, self.eos, 1e4)
        logits = logits.clone()
        logits[:, -1] = torch.where(self.due_at <= self.calls, forced, blocked)
        self.calls += 1
        return logits


def run_reference(tts: Any, requests: Sequence[Request], *, greedy: bool = False, seed: int = 0) -> RunResult:
    """One upstream batch, as ReferenceRunner.run sends a custom-voice batch (max_new_tokens = N + 1)."""
    model = tts.model
    device = model.talker.codec_head.weight.device
    lengths = [r.frames for r in requests]
    hook = ExactLengths(lengths, int(model.config.talker_config.codec_eos_token_id), device)
    codec = model.speech_tokenizer
    captured: list[Tensor] = []
    original_decode = codec.decode

    def spy(batch: list[dict[str, Tensor]]) -> Any:
        captured.extend(entry["audio_codes"].cpu() for entry in batch)
        return original_decode(batch)

    kwargs: dict[str, Any] = {"do_sample": False, "subtalker_dosample": False} if greedy else {}
    torch.manual_seed(seed)
    handle = model.talker.codec_head.register_forward_hook(hook)
    codec.decode = spy
    try:
        sync_device(device)
        t0 = time.perf_counter()
        wavs, _ = tts.generate_custom_voice(
            text=[r.text for r in requests],
            speaker=[r.speaker for r in requests],
            language=[r.language for r in requests],
            instruct=[""] * len(requests),
            max_new_tokens=max(lengths) + 1,
            **kwargs,
        )
        sync_device(device)
        wall = time.perf_counter() - t0
    finally:
        handle.remove()
        del codec.decode
    return RunResult(
        wall_s=wall,
        frames=[int(c.shape[0]) for c in captured],
        samples=[int(np.asarray(w).size) for w in wavs],
        ttff_s=[wall] * len(requests),  # no streaming: the first audio is the whole batch's result
        codes=captured,
    )


@torch.inference_mode()
def warm_codec(tts: Any, lengths: set[int], batches: set[tuple[int, int]]) -> float:
    """Decode random codes once at every length (batch 1) and batch shape the runs will decode, so
    neither engine pays the codec's first-time costs inside a timed section. Returns seconds."""
    codec = tts.model.speech_tokenizer
    shapes = sorted({(1, n) for n in lengths} | batches)
    t0 = time.perf_counter()
    for rows, frames in shapes:
        codec.decode([{"audio_codes": torch.randint(0, 2048, (frames, 16))} for _ in range(rows)])
    return time.perf_counter() - t0


# ---------------------------------------------------------------- report


def p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values), 95))


def _card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Report:
    """Results as they come in; printed as lines and rewritten to DIR/<date>-<card>.{json,md}."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        import transformers

        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.card = _card(device)
        self.concurrency: list[int] = args.concurrency
        self.data: dict[str, Any] = {
            "card": self.card,
            "date": self.started.strftime("%Y-%m-%d"),
            "started_at": self.started.isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, "-m", "bench.bench_engines", *sys.argv[1:]]),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": transformers.__version__,
                "qwen_tts": dist_version("qwen-tts"),
            },
            "settings": {
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "frames_single": args.frames_single,
                "frames_range": [args.frames_min, args.frames_max],
                "concurrency": args.concurrency,
                "budget_s": args.budget_s,
                "weights": "random: linear/embedding N(0, 0.02), conv N(0, 1/fan_in), norms 1",
                "sampling": "upstream defaults (top_k 50, temperature 0.9, repetition_penalty 1.05); check: greedy",
            },
            "results": {"reference": {}, "fast": {}},
            "checks": {},
            "notes": [
                "End to end per request: prompt building, all frames, codec decode to float32 audio.",
                "reference = upstream qwen-tts generate_custom_voice, one padded batch per run, as "
                "ReferenceRunner.run calls it. It does not stream: its ttff is the time to the whole "
                "batch's audio (for c>1 the same for every request).",
                "fast ttff = submit (before prompt building) to the first frame handed to Sequence.on_frame.",
                "Every request produces exactly its target frames in both engines (frames_exact; EOS method below).",
            ],
        }
        if args.out:
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.data['date']}-{self.card}").strip("-")
            self.json_path: Path | None = Path(args.out) / f"{name}.json"
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.json_path = None

    def entry(self, engine: str, label: str) -> dict[str, Any]:
        results = self.data["results"].setdefault(engine, {})
        if label not in results:
            keys = ["xrt_single", "ttff_ms_single"]
            keys += [f"audio_s_per_s_c{c}" for c in sorted({8, 32, 64, *self.concurrency})]
            keys += [f"ttff_ms_p95_c{c}" for c in sorted({64, *self.concurrency})]
            results[label] = dict.fromkeys(keys) | {
                "peak_gib": None,
                "frames_exact": True,
                "runs": {},
                "skipped": [],
                "errors": {},
            }
        return results[label]

    def note_once(self, text: str) -> None:
        if text not in self.data["notes"]:
            self.data["notes"].append(text)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - T_START:7.1f}s] {message}", flush=True)

    def save(self) -> None:
        if self.json_path is None:
            return
        self.data["elapsed_s"] = round(time.perf_counter() - T_START, 1)
        self.json_path.write_text(json.dumps(self.data, indent=2) + "\n")
        self.json_path.with_suffix(".md").write_text(self.markdown())

    def table(self) -> str:
        return results_table(self.data["results"], self.concurrency)

    def markdown(self) -> str:
        d = self.data
        out = [f"# Engines on {d['card']}, {d['date']}", "", f"`{d['command']}`", ""]
        out += [f"Versions: {json.dumps(d['versions'])}", "", self.table(), ""]
        if d["checks"]:
            out += ["## Greedy parity: fast vs. reference", ""]
            head = ["model", "rows x frames", "cb0 equal", "all 16 equal", "first cb0 divergence", "first divergence"]
            keys = ("cb0_equal_fraction", "all_equal_fraction", "first_cb0_divergence_frame", "first_divergence_frame")
            rows = ([label, f"{c['rows']} x {c['frames']}", *(c[k] for k in keys)] for label, c in d["checks"].items())
            out += [markdown_table(head, rows), ""]
        sustained = {label: r["sustained"] for label, r in d["results"].get("fast", {}).items() if r.get("sustained")}
        if sustained:
            out += ["## Fast engine, sustained concurrency (closed loop: each finish submits the next request)", ""]
            head = ["model", "clients", "requests", "window s", "audio-s/s", "ttff p95 ms"]
            keys = ("clients", "requests", "window_s", "audio_s_per_s", "ttff_ms_p95")
            out += [markdown_table(head, ([label, *(r[k] for k in keys)] for label, r in sustained.items())), ""]
        if d.get("graph_checks"):
            out += ["## CUDA graph replay vs. eager (same engine, same seeded requests)", ""]
            rows = ([label, f"{c['rows']} x {c['frames']}", c["identical"]] for label, c in d["graph_checks"].items())
            out += [markdown_table(["model", "rows x frames", "identical"], rows), ""]
        if d.get("fast_engine"):
            out += ["## Fast engine set-up", ""]
            head = ["model", "max_slots", "max_len", "compiled", "graphs", "warm-up s"]
            keys = ("max_slots", "max_len", "compiled", "graphs", "warm_up_s")
            out += [markdown_table(head, ([label, *(f[k] for k in keys)] for label, f in d["fast_engine"].items())), ""]
        if d.get("vram"):
            out += ["## Fast engine GPU memory (GiB) by max_slots", ""]
            head = ["model", "max_len", "weights+codec", "MiB per row", "max_slots", "estimate", "allocated", "peak"]
            rows = (
                [label, v["max_len"], v["weights_and_codec_gib"], v["row_mib"], r["max_slots"]]
                + [
                    fmt_cell(c)
                    for c in (r.get("estimate_gib"), r.get("allocated_gib"), r.get("peak_gib", r.get("error")))
                ]
                for label, v in d["vram"].items()
                for r in v["by_max_slots"]
            )
            out += [markdown_table(head, rows), ""]
            autos = ", ".join(f"{label}: {v['auto_max_slots']}" for label, v in d["vram"].items())
            out += [
                "max_slots the server picks on this card for a first model (auto_slots: half of 90% of the "
                f"card less weights and {WORKSPACE_BYTES / 2**30:.0f} GiB workspace): {autos}",
                "",
            ]
        skipped = [
            f"{engine}/{label}: {s}"
            for engine, models in d["results"].items()
            for label, r in models.items()
            for s in [*r["skipped"], *(f"{k}: FAILED {e}" for k, e in r["errors"].items())]
        ]
        if skipped:
            out += ["## Skipped or failed", "", *[f"- {s}" for s in skipped], ""]
        out += ["## Notes", "", *[f"- {n}" for n in d["notes"]], ""]
        return "\n".join(out)


def results_table(results: dict[str, dict[str, Any]], concurrency: list[int]) -> str:
    """The summary table: a row per engine and model."""
    top = max(concurrency, default=64)
    head = ["engine", "model", "xrt_single", "ttff_ms_single"]
    head += [f"audio_s/s c{c}" for c in concurrency] + [f"ttff_ms_p95_c{top}", "peak_GiB"]
    rows = []
    for engine, models in results.items():
        for label, r in models.items():
            cells = [r["xrt_single"], r["ttff_ms_single"]]
            cells += [r.get(f"audio_s_per_s_c{c}") for c in concurrency]
            cells += [r.get(f"ttff_ms_p95_c{top}"), r["peak_gib"]]
            rows.append([engine, label, *(fmt_cell(v) for v in cells)])
    return markdown_table(head, rows)


def fmt_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


# ---------------------------------------------------------------- the sweep


class Budget:
    """Wall-clock budget from process start; sections that would overrun it are skipped.

    `step_s` keeps each engine's latest wall time per frame step (the warm-up's, raised by any slower
    run after it), from which a section's time is estimated before it starts.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.step_s: dict[str, float] = {}

    @property
    def left_s(self) -> float:
        return self.limit_s - (time.perf_counter() - T_START)

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left_s


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


@dataclasses.dataclass
class Plan:
    frames_single: int
    frames_min: int
    frames_max: int
    concurrency: list[int]
    check_rows: int
    check_frames: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        return cls(
            frames_single=args.frames_single,
            frames_min=args.frames_min,
            frames_max=args.frames_max,
            concurrency=args.concurrency,
            check_rows=args.check_rows,
            check_frames=args.check_frames,
        )

    @property
    def check_requests(self) -> list[Request]:
        return [make_request(100 + i, self.check_frames) for i in range(self.check_rows)]

    def all_requests(self) -> list[Request]:
        out = [make_request(0, self.frames_single), *self.check_requests]
        for c in self.concurrency:
            out += mixed_requests(c, self.frames_min, self.frames_max)
        return out


def sweep_engine(
    name: str,
    run: Callable[[list[Request], bool], RunResult],
    label: str,
    plan: Plan,
    report: Report,
    budget: Budget,
    device: torch.device,
    check: dict[str, list[Tensor]],
) -> None:
    """Warm-up, greedy check rows, single stream, then each concurrency level, within the budget."""
    entry = report.entry(name, label)

    def section(key: str, requests: list[Request], *, greedy: bool = False, growth: float = 1.0) -> RunResult | None:
        steps = max(r.frames for r in requests)
        step_s = budget.step_s.get(name)
        estimate = 5.0 if step_s is None else steps * step_s * growth + 2.0
        if not budget.allows(estimate):
            entry["skipped"].append(f"{key}: needs ~{estimate:.0f} s, {budget.left_s:.0f} s left")
            report.log(f"{name} {label} {key}: skipped (needs ~{estimate:.0f} s, {budget.left_s:.0f} s left)")
            report.save()
            return None
        try:
            result = run(requests, greedy)
        except Exception as exc:  # e.g. out of memory: record it, keep the other sections' data
            entry["errors"][key] = f"{type(exc).__name__}: {exc}"[:500]
            report.log(f"{name} {label} {key}: FAILED {type(exc).__name__}: {exc}")
            report.save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        measured = result.wall_s / steps
        budget.step_s[name] = measured if key == "warmup" else max(step_s or 0.0, measured)
        exact = result.exact(requests)
        entry["frames_exact"] = entry["frames_exact"] and exact
        entry["runs"][key] = {
            "requests": len(requests),
            "frames": sum(result.frames),
            "audio_s": round(result.audio_s, 2),
            "wall_s": round(result.wall_s, 3),
            "ms_per_step": round(1000 * result.wall_s / steps, 1),
            "exact_lengths": exact,
        }
        if result.seconds is not None:
            entry["runs"][key]["engine_seconds"] = result.seconds
        if result.ttff_parts_ms is not None:
            entry["runs"][key]["ttff_parts_ms_p95"] = result.ttff_parts_ms
        report.log(
            f"{name} {label} {key}: {len(requests)} req, {result.audio_s:.1f} audio s in {result.wall_s:.2f} s "
            f"({result.audio_s / result.wall_s:.2f} audio-s/s, {1000 * result.wall_s / steps:.0f} ms/step, "
            f"ttff p95 {1000 * p95(result.ttff_s):.0f} ms, exact={exact})"
            + (f" engine seconds {result.seconds}" if result.seconds else "")
            + (f" ttff parts p95 ms {result.ttff_parts_ms}" if result.ttff_parts_ms else "")
        )
        return result

    _peak_reset(device)
    single = [make_request(0, plan.frames_single)]
    if section("warmup", single) is None:
        entry["skipped"].append("all: no time left for the warm-up")
        return
    if plan.check_rows:
        result = section("check", plan.check_requests, greedy=True)
        if result is not None and result.codes is not None:
            check[name] = result.codes
    result = section("single", single)
    if result is not None:
        entry["xrt_single"] = round(result.audio_s / result.wall_s, 3)
        entry["ttff_ms_single"] = round(1000 * result.ttff_s[0], 1)
    report.save()
    for c in plan.concurrency:
        requests = mixed_requests(c, plan.frames_min, plan.frames_max)
        # The fast engine's step grows with the batch; upstream's hardly moves (gpu-device.md).
        result = section(f"c{c}", requests, growth=1.6 if name == "fast" else 1.25)
        if result is not None:
            entry[f"audio_s_per_s_c{c}"] = round(result.audio_s / result.wall_s, 2)
            entry[f"ttff_ms_p95_c{c}"] = round(1000 * p95(result.ttff_s), 1)
        entry["peak_gib"] = peak_gib(device)
        report.save()
    entry["peak_gib"] = peak_gib(device)
    report.save()


PEER = "faster-qwen3-tts"


def run_peer(size: Size, args: argparse.Namespace, plan: Plan, report: Report, budget: Budget) -> None:
    """The published peer on the same card, same request lists, in its own process: it needs
    transformers 5 (the image's) and its own fork of qwen-tts, which cannot share our process with
    the official qwen-tts 0.1.1. Its rows join this report under the engine name `faster-qwen3-tts`."""
    label = MODEL_LABELS[size]
    limit = min(args.peer_budget_s, budget.left_s - args.peer_reserve_s)
    if limit < 60:
        report.entry(PEER, label)["skipped"].append(f"all: {limit:.0f} s left for the peer")
        report.log(f"{PEER} {label}: skipped ({limit:.0f} s left for it)")
        return
    with tempfile.TemporaryDirectory(prefix="qtts-peer-") as tmp:
        out = Path(tmp) / "peer.json"
        command = [args.peer_python, "-m", "bench.peer_faster", "--sizes", size, "--out", str(out)]
        command += ["--tiny"] if size == "tiny" else []
        command += ["--single-frames", str(plan.frames_single), "--low", str(plan.frames_min)]
        command += ["--high", str(plan.frames_max), "--concurrency", ",".join(str(c) for c in plan.concurrency)]
        command += ["--budget-s", f"{limit:.0f}", "--device", args.device]
        env = dict(os.environ, PYTHONPATH=args.peer_pythonpath)
        report.log(f"{PEER} {label}: {shlex.join(command)} (PYTHONPATH={args.peer_pythonpath})")
        returncode: int | None = None
        try:
            returncode = subprocess.run(command, env=env, timeout=limit + 60, check=False).returncode
        except subprocess.TimeoutExpired:  # it saves after every section: keep what it finished
            report.log(f"{PEER} {label}: timed out after {limit + 60:.0f} s")
        try:
            data = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            report.entry(PEER, label)["errors"]["all"] = f"{type(exc).__name__}: {exc}"[:500]
            report.log(f"{PEER} {label}: FAILED {type(exc).__name__}: {exc}")
            report.save()
            return
    report.data["results"].setdefault(PEER, {}).update(data["results"].get(PEER, {}))
    report.data.setdefault("peer", {})[label] = {
        "returncode": returncode,
        "versions": data.get("versions"),
        "settings": data.get("settings"),
        "models": data.get("models"),
    }
    for note in data.get("notes", []):
        report.note_once(f"{PEER}: {note}")
    report.save()


def vram_report(
    tts: Any, label: str, slot_counts: list[int], max_len: int, report: Report, device: torch.device
) -> None:
    """GPU memory of the fast engine at several max_slots: what it allocates (weights, codec, KV
    cache and row state) against the planner's estimate, and the peak through a packed prefill and
    one eager full-batch frame reading the whole KV length. Graph pools and compile are not in it."""
    gib = 2**30
    gc.collect()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    per_row = row_bytes(tts, max_len)
    total = torch.cuda.get_device_properties(device).total_memory
    rows: list[dict[str, Any]] = []
    for count in slot_counts:
        entry: dict[str, Any] = {"max_slots": count, "estimate_gib": round((weights + count * per_row) / gib, 2)}
        engine = None
        try:
            _peak_reset(device)
            engine = FastEngine(tts, max_slots=count, max_len=max_len, cuda_graphs=False)
            entry["allocated_gib"] = round(torch.cuda.memory_allocated(device) / gib, 2)
            sampling = resolve_sampling(SamplingParams(seed=0), tts.generate_defaults or {})
            sampling = dataclasses.replace(sampling, min_frames=100)  # nobody leaves before all are in
            for i in range(count):
                prompt = prompt_for_item(tts, Mode.CUSTOM_VOICE, make_request(i, 100).item)
                seq = FastSequence(prompt=prompt, sampling=sampling, max_frames=100)
                seq.decode_audio = False  # the frames' memory: no codec chunk decoded inside a step
                engine.submit(seq)
            for _ in range(count):
                if len(engine.scheduler.running) == count:
                    break
                engine.step()
            plans = (SamplingPlan(), SamplingPlan())
            with torch.inference_mode(), engine.preserved_rows(count):
                engine.frame(count, max_len, plans)
            sync_device(device)
            entry["peak_gib"] = peak_gib(device)
        except torch.cuda.OutOfMemoryError:
            entry["error"] = "out of memory"
        finally:
            if engine is not None:
                engine.stop()
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(entry)
        report.log(f"vram {label} max_slots {count}: {entry}")
    try:
        auto = auto_slots(per_row, int(0.9 * total), weights)  # as the server picks for a first model
    except ValueError:
        auto = 0
    report.data.setdefault("vram", {})[label] = {
        "max_len": max_len,
        "weights_and_codec_gib": round(weights / gib, 2),
        "row_mib": round(per_row / 2**20, 1),
        "card_gib": round(total / gib, 1),
        "auto_max_slots": auto,
        "by_max_slots": rows,
    }
    report.save()


def sustained(fast: FastBench, label: str, plan: Plan, report: Report, budget: Budget) -> None:
    """The fast engine at its largest concurrency as a closed loop (4x that many requests)."""
    clients = max(plan.concurrency, default=0)
    step_s = budget.step_s.get("fast")
    if not clients or step_s is None or not budget.allows(4 * plan.frames_max * step_s * 1.6 + 10):
        return
    requests = mixed_requests(4 * clients, plan.frames_min, plan.frames_max)
    try:
        result = fast.run_sustained(requests, clients)
    except Exception as exc:
        report.entry("fast", label)["errors"]["sustained"] = f"{type(exc).__name__}: {exc}"[:500]
        return
    report.entry("fast", label)["sustained"] = result
    report.log(f"fast {label} sustained c{clients}: {result}")
    report.save()


def graph_check(fast: FastBench, plan: Plan, label: str, report: Report) -> None:
    """Graph replay equals eager: the same seeded (sampling) requests through the same engine, with
    and without its CUDA graphs, must give identical codes.

    Only if both runs step the same batches: in bf16 a request's numbers depend on the batch size it
    runs at, and eager steps are slower than replayed ones, so requests admitted one by one would
    join at different steps. Both runs therefore admit every row in their first step (`together`),
    and the result keeps each run's batch size per step; `same_batches` false voids `identical`."""
    requests = plan.check_requests
    eager = fast.run(requests, graphs=False, together=True)
    replayed = fast.run(requests, graphs=True, together=True)
    result: dict[str, Any] = {"rows": len(requests), "frames": plan.check_frames, "sampling": "seeded"}
    result |= compare_codes(replayed.codes or [], eager.codes or [])
    sizes = {"eager": eager.batch_sizes or [], "graphs": replayed.batch_sizes or []}
    result["same_batches"] = sizes["eager"] == sizes["graphs"]
    result["batch_sizes"] = sizes
    report.data.setdefault("graph_checks", {})[label] = result
    report.log(
        f"graph replay vs eager {label}: identical={result['identical']}, same_batches={result['same_batches']} "
        f"(first step rows {sizes['eager'][:1]} / {sizes['graphs'][:1]} of {len(requests)})"
    )
    report.save()


def compare_codes(fast: list[Tensor], reference: list[Tensor]) -> dict[str, Any]:
    """Codebook-0 and whole-frame agreement over each row's common prefix, and where rows first differ."""
    cb0 = whole = total = 0
    first_cb0: list[int | None] = []
    first_any: list[int | None] = []
    for a, b in zip(fast, reference, strict=True):
        n = min(a.shape[0], b.shape[0])
        a, b = a[:n].cpu(), b[:n].cpu()
        same_cb0 = a[:, 0] == b[:, 0]
        same_frame = (a == b).all(dim=1)
        cb0 += int(same_cb0.sum())
        whole += int(same_frame.sum())
        total += n
        for same, firsts in ((same_cb0, first_cb0), (same_frame, first_any)):
            diverged = (~same).nonzero()
            firsts.append(int(diverged[0, 0]) if diverged.numel() else None)
    return {
        "cb0_equal_fraction": round(cb0 / max(total, 1), 4),
        "all_equal_fraction": round(whole / max(total, 1), 4),
        "first_cb0_divergence_frame": first_cb0,  # per row; None: equal over the whole common prefix
        "first_divergence_frame": first_any,  # per row, any of the 16 codebooks
        "identical": all(f is None for f in first_any),
    }


def bench_size(size: Size, args: argparse.Namespace, plan: Plan, report: Report, budget: Budget, codec: Any) -> Any:
    device, dtype = torch.device(args.device), args.dtype
    label = MODEL_LABELS[size]
    sync_device(device)
    t0 = time.perf_counter()
    tts = build_model(size, device=device, dtype=dtype, speech_tokenizer=codec)
    sync_device(device)
    params = sum(p.numel() for p in tts.model.parameters())
    report.log(f"built {label}: {params / 1e6:.1f}M parameters (codec apart) in {time.perf_counter() - t0:.1f} s")
    report.data.setdefault("models", {})[label] = {
        "params_m": round(params / 1e6, 1),
        "build_s": round(time.perf_counter() - t0, 1),
    }

    requests = plan.all_requests()
    if not getattr(codec, "_bench_warm", False):
        # Upstream decodes each run as one padded batch; the fast engine decodes rows as they finish.
        batches = {(c, plan.frames_max) for c in plan.concurrency}
        if plan.check_rows:
            batches.add((plan.check_rows, plan.check_frames))
        seconds = warm_codec(tts, {r.frames for r in requests}, batches)
        codec._bench_warm = True
        report.data["codec_warmup_s"] = round(seconds, 1)
        report.log(f"codec warm-up over {len({r.frames for r in requests})} lengths: {seconds:.1f} s")

    check: dict[str, list[Tensor]] = {}
    if PEER in args.engines:
        run_peer(size, args, plan, report, budget)
    if "fast" in args.engines:
        longest = max(int(prompt_for_item(tts, Mode.CUSTOM_VOICE, r.item).embeds.shape[0]) for r in requests)
        max_len = args.max_len or 64 * math.ceil((longest + max(r.frames for r in requests) + 16) / 64)
        max_slots = max([1, plan.check_rows, *plan.concurrency])
        compile = args.compile and device.type == "cuda"
        fast = FastBench(tts, max_slots=max_slots, max_len=max_len, compile=compile)
        report.note_once(f"EOS method: {fast.eos_method}; reference: ExactLengths hook on talker.codec_head.")
        graphs = len(fast.engine.graphs or ())
        report.log(
            f"fast engine: max_slots {max_slots}, max_len {max_len} (longest prompt {longest}), compiled "
            f"{fast.engine.runner.compiled}, {graphs} graphs captured, warm-up {fast.warm_up_s:.1f} s"
        )
        report.data.setdefault("fast_engine", {})[label] = {
            "max_slots": max_slots,
            "max_len": max_len,
            "compiled": fast.engine.runner.compiled,
            "graphs": graphs,
            "warm_up_s": round(fast.warm_up_s, 1),
        }
        try:
            if graphs and plan.check_rows:
                graph_check(fast, plan, label, report)
            sweep_engine(
                "fast", lambda reqs, greedy: fast.run(reqs, greedy=greedy), label, plan, report, budget, device, check
            )
            sustained(fast, label, plan, report, budget)
        finally:
            fast.close()
            del fast
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "reference" in args.engines:
        sweep_engine(
            "reference",
            lambda reqs, greedy: run_reference(tts, reqs, greedy=greedy),
            label,
            plan,
            report,
            budget,
            device,
            check,
        )
    if args.vram and device.type == "cuda" and budget.allows(30.0):
        vram_report(tts, label, args.vram, args.max_len or 4096, report, device)
    if "fast" in check and "reference" in check:
        result = {
            "rows": plan.check_rows,
            "frames": plan.check_frames,
            **compare_codes(check["fast"], check["reference"]),
        }
        report.data["checks"][label] = result
        report.log(f"greedy parity {label}: {result}")
        report.save()
    return tts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default=None, help="comma list of 1.7B,0.6B (default both; --tiny: tiny)")
    p.add_argument("--engines", default=None, help=f"comma list of reference,fast,{PEER} (--tiny: no {PEER})")
    p.add_argument(
        "--peer-pythonpath",
        default=".:/tmp/site_peer:/tmp/site_common",
        help=f"PYTHONPATH of the {PEER} process (its wheels, see the module docstring)",
    )
    p.add_argument("--peer-python", default=sys.executable, help=f"python of the {PEER} process")
    p.add_argument("--peer-budget-s", type=float, default=240.0, help=f"most seconds for {PEER} per model")
    p.add_argument("--peer-reserve-s", type=float, default=240.0, help="seconds the peer leaves for the others")
    p.add_argument("--concurrency", default=None, help="comma list (default 8,32,64; --tiny: 2,4)")
    p.add_argument("--frames-single", type=int, default=None, help="single-stream frames (default 100; --tiny: 12)")
    p.add_argument("--frames-min", type=int, default=None, help="shortest mixed request (default 50; --tiny: 6)")
    p.add_argument("--frames-max", type=int, default=None, help="longest mixed request (default 150; --tiny: 18)")
    p.add_argument("--check-rows", type=int, default=None, help="greedy parity rows (default 4; --tiny: 2; 0: off)")
    p.add_argument("--check-frames", type=int, default=None, help="greedy parity frames (default 40; --tiny: 10)")
    p.add_argument("--budget-s", type=float, default=None, help="wall budget from start (default 460; --tiny: 100)")
    p.add_argument("--tiny", action="store_true", help="tiny configs and counts: a CPU smoke test")
    p.add_argument("--max-len", type=int, default=None, help="fast engine KV length (default: the longest request)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="fast engine without torch.compile")
    p.add_argument("--vram", default=None, help="comma list of max_slots for the VRAM report (default 1,32,64,128)")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default bfloat16 on cuda, else float32)")
    p.add_argument("--out", default=None, help="write DIR/<date>-<card>.json and .md")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {
        "sizes": "tiny" if tiny else "1.7B,0.6B",
        "concurrency": "2,4" if tiny else "8,32,64",
        "frames_single": 12 if tiny else 100,
        "frames_min": 6 if tiny else 50,
        "frames_max": 18 if tiny else 150,
        "check_rows": 2 if tiny else 4,
        "check_frames": 10 if tiny else 40,
        "budget_s": 100.0 if tiny else 460.0,
        "device": "cuda" if torch.cuda.is_available() and not tiny else "cpu",
        "vram": "" if tiny else "1,32,64,128",
        "engines": "reference,fast" if tiny else f"reference,fast,{PEER}",  # the peer needs CUDA
    }
    finish_args(p, args, defaults)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(args.engines) - {"reference", "fast", PEER}:
        p.error(f"unknown engines {sorted(unknown)}")
    args.vram = [int(c) for c in args.vram.split(",") if c.strip()]
    return args


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """What this bench and `bench.peer_faster` do alike after parsing: fill unset options from
    `defaults`, and turn --sizes, --concurrency and --dtype into a checked list, ints and a dtype."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = ["tiny"] if args.tiny else [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := set(args.sizes) - set(MODEL_LABELS):
        p.error(f"unknown sizes {sorted(unknown)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.dtype = getattr(torch, args.dtype)


_MERGED_SECTIONS = ("checks", "graph_checks", "fast_engine", "vram", "peer", "models")


def merge_reports(paths: Sequence[Path], out: Path) -> Path:
    """One report from several runs of this command (e.g. one model per call on a lent GPU, whose
    commands are limited to 10 minutes): results and per-model sections side by side, and each
    run's command and start time kept."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    cards = {r["card"] for r in runs}
    if len(cards) != 1:
        raise SystemExit(f"runs come from different cards: {sorted(cards)}")
    data = json.loads(json.dumps(runs[0]))
    data["runs"] = [{"command": r["command"], "started_at": r["started_at"]} for r in runs]
    for run in runs[1:]:
        for engine, models in run["results"].items():
            data["results"].setdefault(engine, {}).update(models)
        for key in _MERGED_SECTIONS:
            if key in run:
                data.setdefault(key, {}).update(run[key])
        data["notes"] += [n for n in run["notes"] if n not in data["notes"]]
    data["command"] = " ; ".join(r["command"] for r in runs)
    report = object.__new__(Report)
    report.data, report.card = data, data["card"]
    report.concurrency = sorted({c for r in runs for c in r["settings"]["concurrency"]})
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{data['date']}-{re.sub(r'[^A-Za-z0-9._-]+', '-', data['card']).strip('-')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.with_suffix(".md").write_text(report.markdown())
    print(report.table())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    import transformers

    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--merge":
        *inputs, flag, out = sys.argv[2:]
        if flag != "--out" or not inputs:
            raise SystemExit("usage: python -m bench.bench_engines --merge RUN.json [RUN.json ...] --out DIR")
        print(f"wrote {merge_reports([Path(p) for p in inputs], Path(out))}")
        return 0

    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # upstream's per-call generate warnings
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = str(device)
    plan = Plan.from_args(args)
    report = Report(args, device, args.dtype)
    budget = Budget(args.budget_s)
    report.log(f"{report.card}, torch {torch.__version__}, {args.dtype}, sizes {args.sizes}, engines {args.engines}")
    codecs: dict[bool, Any] = {}
    for size in args.sizes:
        if not budget.allows(15.0):
            report.log(f"{size}: skipped, {budget.left_s:.0f} s left")
            continue
        tiny = size == "tiny"
        if tiny not in codecs:  # one codec for every model: the published ones share it
            sync_device(device)
            t0 = time.perf_counter()
            codecs[tiny] = build_speech_tokenizer(size, device, args.dtype)
            sync_device(device)
            report.log(f"built speech tokenizer in {time.perf_counter() - t0:.1f} s")
        tts = bench_size(size, args, plan, report, budget, codecs[tiny])
        del tts
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if size != args.sizes[-1]:
            print(report.table(), flush=True)  # partial results, in case a later size runs out of time
    report.save()
    print("\n" + report.table(), flush=True)
    if report.json_path is not None:
        print(f"wrote {report.json_path} and {report.json_path.with_suffix('.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
