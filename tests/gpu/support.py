"""The GPU tier's shared pieces: its settings (from the environment), the results file, numeric comparisons,
and drivers that run requests through a `FastEngine` while recording what every step produced.

Environment (all optional):
  QTTS_GPU_TEST_MODELS   folder holding a full-size Qwen3-TTS-12Hz-1.7B-CustomVoice written by bench/checkpoint.py
                         (default /tmp/models); without one the tier runs, smaller, on the tiny checkpoints
  QTTS_GPU_TEST_DEVICE   cuda (the default where CUDA is available) or cpu (development: tiny checkpoints, fp32)
  QTTS_GPU_TEST_DTYPE    bfloat16 on CUDA, float32 on the CPU (the server's `auto`)
  QTTS_GPU_TEST_COMPILE  1 (default on CUDA, as served) or 0: torch.compile of the fast engine's layer parts
  QTTS_FUSED_ATTENTION   the server's own setting (config.py; default all): which decode layers of the
                         tier's engines run the fused attention kernel
  QTTS_GPU_TEST_RESULTS  the JSON file the numbers go to (default bench/results/gpu-tests-<date>.json)
  QTTS_GPU_TEST_REPEATS  runs of each kind per batch size in the graph-vs-eager test (default 2)
bench/gpu_tests.sh adds QTTS_GPU_TEST_BUILD (0: do not write the checkpoint) and QTTS_GPU_TEST_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qwen_tts_server.config import Settings
from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.options import FusedAttention
from qwen_tts_server.engine.fast.prompt import Prompt, prompt_for_item
from qwen_tts_server.engine.fast.runtime import resolve_sampling
from qwen_tts_server.engine.fast.sequence import AudioStream, SequenceSampling, SequenceStatus
from qwen_tts_server.engine.fast.sequence import Sequence as FastSequence
from qwen_tts_server.engine.types import Mode, SamplingParams, SynthesisItem

REPO = Path(__file__).resolve().parents[2]
MODEL = "Qwen3-TTS-12Hz-1.7B-CustomVoice"
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DTYPES |= {"float32": torch.float32, "fp32": torch.float32}
# The shared engine: 16 rows cover the batch buckets 1..16 and 512 positions two KV buckets (256, 512), which
# keeps warm-up (compile and graph capture) to well under a minute on an H200 while exercising every mechanism.
MAX_SLOTS = 16
MAX_LEN = 512
SENTENCE = (
    "the quick brown fox jumps over a lazy dog while seven bright stars hang above quiet hills and rivers run "
    "to the sea under a pale morning sky full of birds singing songs of summer"
)


@dataclass(frozen=True)
class Tier:
    """Where and how the tier runs (see the module docstring)."""

    device: torch.device
    dtype: torch.dtype
    compile: bool
    fused_attention: FusedAttention
    models_dir: Path
    results_path: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def from_env(cls) -> Tier | None:
        """None where there is nothing to run on: no CUDA device and no QTTS_GPU_TEST_DEVICE=cpu."""
        name = os.environ.get("QTTS_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
        if not name or (name.startswith("cuda") and not torch.cuda.is_available()):
            return None
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        cuda = device.type == "cuda"
        dtype = DTYPES[os.environ.get("QTTS_GPU_TEST_DTYPE", "bfloat16" if cuda else "float32").lower()]
        compile = cuda and os.environ.get("QTTS_GPU_TEST_COMPILE", "1") not in ("0", "false", "no")
        date = datetime.date.today().isoformat()
        results = os.environ.get("QTTS_GPU_TEST_RESULTS") or str(REPO / "bench" / "results" / f"gpu-tests-{date}.json")
        return cls(
            device=device,
            dtype=dtype,
            compile=compile,
            fused_attention=Settings().fused_attention,  # as the server would run
            models_dir=Path(os.environ.get("QTTS_GPU_TEST_MODELS", "/tmp/models")),
            results_path=Path(results),
        )


# ---------------------------------------------------------------- the results file


def _plain(value: Any) -> Any:
    """JSON-ready: tensors and numpy values become lists and floats (non-finite floats become strings)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path | torch.dtype | torch.device):
        return str(value)
    return value


def _shown(value: Any) -> Any:
    """What the log shows of a value: lists longer than 8 items (per-step series) only in the JSON."""
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} values in the JSON]"
    return value


class Results:
    """One JSON file per run: a header (device, versions, settings) and each test's numbers and outcome,
    rewritten after every record so that a run cut short still leaves what it measured. Every record is
    printed too (run pytest with -s), so the run log is the report."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**_plain(header), "tests": {}}
        self._lock = threading.Lock()
        self.save()

    def record(self, test: str, **values: Any) -> None:
        """Store `values` under `test` and print them (long lists only in the file)."""
        plain = _plain(values)
        with self._lock:
            self.data["tests"].setdefault(test, {}).update(plain)
        for key, value in plain.items():
            text = json.dumps(_shown(value))
            shown = text if len(text) <= 1000 else f"({len(text)} characters, in the JSON)"
            print(f"[gpu] {test}: {key} = {shown}")
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with self._lock:
            tmp.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.path)


def header(tier: Tier, checkpoint: Path, full_size: bool) -> dict[str, Any]:
    """Where the numbers come from: the card, the versions (and the ones bench/versions.txt pins), settings."""
    from bench.versions import report

    card = torch.cuda.get_device_name(tier.device) if tier.cuda else platform.processor() or "cpu"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "card": card,
        "versions": report(),
        "settings": {
            "device": tier.device,
            "dtype": tier.dtype,
            "compile": tier.compile,
            "fused_attention": tier.fused_attention,
            "checkpoint": checkpoint,
            "full_size": full_size,
            "max_slots": MAX_SLOTS,
            "max_len": MAX_LEN,
        },
    }


# ---------------------------------------------------------------- numbers


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Exact fp32 references: TF32 (cuDNN's default for convolutions, optional for matmuls) off meanwhile."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def max_abs(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max()) if a.numel() else 0.0


def rms(x: Tensor | np.ndarray) -> float:
    x = torch.as_tensor(x).double()
    return float(x.square().mean().sqrt()) if x.numel() else 0.0


def kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax(p) || softmax(q)) over the last dimension, in float64, one value per leading index."""
    p = F.log_softmax(p_logits.double(), dim=-1)
    q = F.log_softmax(q_logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1).clamp(min=0.0)


def summary(values: Tensor) -> dict[str, float]:
    values = values.double().flatten()
    return {"mean": float(values.mean()), "max": float(values.max())}


# ---------------------------------------------------------------- prompts and requests


def text_of(words: int, start: int = 0) -> str:
    vocabulary = SENTENCE.split()
    text = " ".join(vocabulary[(start + i) % len(vocabulary)] for i in range(max(words, 1)))
    return text[0].upper() + text[1:] + "."


def custom_prompt(tts: Any, text: str, speaker: str = "ryan") -> Prompt:
    return prompt_for_item(tts, Mode.CUSTOM_VOICE, SynthesisItem(text=text, language="english", speaker=speaker))


def prompt_of_length(tts: Any, positions: int, start: int = 0, speaker: str = "ryan") -> Prompt:
    """A custom-voice prompt of `positions` talker positions or a few more (a word is several tokens): to put
    a request just before a KV bucket's end, so that its batch crosses into the next bucket while it runs."""
    words = 4
    while True:
        prompt = custom_prompt(tts, text_of(words, start), speaker)
        if prompt.embeds.shape[0] >= positions:
            return prompt
        words += max(1, (positions - prompt.embeds.shape[0]) // 8)


def sampling(tts: Any, seed: int, **options: Any) -> SequenceSampling:
    """A request's resolved options, as FastRuntime resolves them (checkpoint defaults under `options`)."""
    return resolve_sampling(SamplingParams(seed=seed, **options), tts.generate_defaults or {})


@dataclass(eq=False)
class Request:
    """One request to submit, and what came back: frames (on the Sequence), streamed audio chunks."""

    prompt: Prompt
    options: SequenceSampling
    frames: int
    stream: bool = False
    decode_audio: bool = False
    seq: FastSequence | None = None
    chunks: list[np.ndarray] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def make(self) -> FastSequence:
        """A fresh Sequence held to exactly `frames` frames (EOS masked until then: random weights)."""
        self.chunks, self.done = [], threading.Event()
        chunks, done = self.chunks, self.done
        self.seq = FastSequence(
            prompt=self.prompt,
            sampling=dataclasses.replace(self.options, min_frames=self.frames),
            max_frames=self.frames,
            decode_audio=self.decode_audio,
            stream=AudioStream(on_audio=lambda _s, audio: chunks.append(np.asarray(audio))) if self.stream else None,
            on_finish=lambda _s: done.set(),
        )
        return self.seq

    @property
    def codes(self) -> Tensor:
        assert self.seq is not None and self.seq.frames, "request has not run"
        return torch.stack(self.seq.frames)

    @property
    def streamed(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)


def run_sync(engine: FastEngine, requests: Sequence[Request]) -> None:
    """Submit every request, then step the (not started) engine by hand until all finish: every request is
    admitted in the first step, so the batch is the same on every run."""
    seqs = [engine.submit(r.make()) for r in requests]
    for _ in range(max(r.frames for r in requests) + 8):
        if all(s.status is SequenceStatus.FINISHED for s in seqs):
            break
        engine.step()
    check_finished(requests)


def wait_for(requests: Sequence[Request], timeout_s: float) -> None:
    """Wait for requests running on the engine's threads; fail (naming them) if they do not finish."""
    deadline = time.perf_counter() + timeout_s
    for r in requests:
        if not r.done.wait(max(0.0, deadline - time.perf_counter())):
            raise AssertionError(f"request of {r.frames} frames unfinished after {timeout_s:.0f} s")
    check_finished(requests)


def check_finished(requests: Sequence[Request]) -> None:
    for r in requests:
        assert r.seq is not None and r.seq.status is SequenceStatus.FINISHED, "request did not finish"
        if r.seq.error is not None:
            raise AssertionError(f"request failed: {r.seq.error!r}") from r.seq.error
        assert r.seq.num_frames == r.frames, f"{r.seq.num_frames} frames, expected {r.frames}"


# ---------------------------------------------------------------- what each step produced


@dataclass
class StepLog:
    rows: int  # running requests in this step
    bucket: int  # the batch bucket the frame ran at (graph key)
    kv_len: int  # the KV read length (graph key)
    logits: Tensor  # [rows, V] float32 on the host: the talker logits this step produced (next codebook 0)
    hidden: Tensor  # [rows, H] the talker's last hidden state (the logits' input), on the host
    out: Tensor  # [rows, 17] the step's frames and EOS flags, on the host


@contextlib.contextmanager
def recording(engine: FastEngine) -> Iterator[list[StepLog]]:
    """Record every frame step of `engine` (on whichever thread runs it).

    Wraps the instance's `_run_frame` (graph replay or eager): after the frame, the talker logits of the
    running rows are recomputed eagerly from the hidden state the frame wrote (`codec_head` over
    `engine.rows.hidden`), one and the same op after graph and eager frames alike, so any difference between two
    runs comes from the frames. The hidden states are kept too. Adds a host sync per step: for tests only.
    """
    steps: list[StepLog] = []
    original = engine._run_frame
    head = engine.runner.talker.codec_head.weight

    def run_frame(size: int, kv_len: int, plans: Any) -> Tensor:
        out = original(size, kv_len, plans)
        rows = len(engine.scheduler.running)
        hidden = engine.rows.hidden[:rows]
        logits = F.linear(hidden, head).float().cpu()
        steps.append(StepLog(rows, size, kv_len, logits, hidden.float().cpu(), out[:rows].cpu()))
        return out

    engine._run_frame = run_frame  # type: ignore[method-assign]
    try:
        yield steps
    finally:
        del engine._run_frame


@contextlib.contextmanager
def graphs_off(engine: FastEngine) -> Iterator[None]:
    """Run the same engine (same buckets, state, compiled functions) eagerly: no graph replay."""
    saved = engine.graphs
    engine.graphs = None
    try:
        yield
    finally:
        engine.graphs = saved


def compare_runs(a: list[StepLog], b: list[StepLog]) -> dict[str, Any]:
    """Two runs of the same requests: logits and codes per step, and where they first differ."""
    steps = min(len(a), len(b))
    first_logits = first_codes = None
    per_step = []
    for k in range(steps):
        x, y = a[k], b[k]
        if x.logits.shape != y.logits.shape:
            per_step.append(float("inf"))
            first_logits = k if first_logits is None else first_logits
            first_codes = k if first_codes is None else first_codes
            continue
        diff = max_abs(x.logits, y.logits)
        per_step.append(diff)
        if (diff > 0 or not torch.equal(x.hidden, y.hidden)) and first_logits is None:
            first_logits = k
        if first_codes is None and not torch.equal(x.out, y.out):
            first_codes = k
    where = None
    if first_logits is not None and a[first_logits].logits.shape == b[first_logits].logits.shape:
        x, y = a[first_logits], b[first_logits]
        per_row = (x.hidden - y.hidden).abs().amax(dim=1)
        where = {
            "step": first_logits,
            "rows_differing": per_row.nonzero().flatten().tolist(),
            "hidden_max_abs": float(per_row.max()),
            "logits_max_abs": max_abs(x.logits, y.logits),
            "batch_bucket": x.bucket,
            "kv_len": x.kv_len,
            "other_run_bucket_kv": [y.bucket, y.kv_len],
        }
    before = per_step[:first_codes] if first_codes is not None else per_step
    return {
        "steps": steps,
        "same_step_count": len(a) == len(b),
        "codes_identical": first_codes is None and len(a) == len(b),
        "first_code_difference_step": first_codes,
        "logits_bitwise_equal": first_logits is None,  # and the hidden states they come from
        "logits_max_abs": max(per_step, default=0.0),
        "logits_max_abs_before_codes_differ": max(before, default=0.0),
        "first_logits_difference": where,
        "logits_max_abs_per_step": per_step,
    }


# ---------------------------------------------------------------- compiles and captures


def compiles() -> int:
    """Frames torch.compile (dynamo) has converted so far: each is a compile or a recompile (a cache miss)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def captures(engine: FastEngine) -> dict[str, int]:
    """CUDA graphs the engine holds: frame steps, whole-utterance codec decode (only with the context chunk
    decoder), streaming codec decode."""
    stream = engine.streaming_decoder
    return {
        "frame": len(engine.graphs) if engine.graphs is not None else 0,
        "codec": len(engine.codec),
        "stream_codec": len(stream) if stream is not None else 0,
    }
