"""The step thread's own work, per part of a step, while requests come and go: tensor calls and host time.

With a closed loop of clients a few running requests end in most steps: compaction moves the last rows into
their holes, and the newcomers' rows are set up after their prefill. Every tensor call the step thread makes
is a launch between two frames, and all its Python holds the GIL the codec thread wants. This turns over
`--churn` of `--rows` running requests per step (cancelled at rows spread over the batch, as many submitted;
0 for none) and reports, per step:

- `compact`: `FastEngine._compact` (the rows' state and their KV moved);
- `admit`: `FastEngine._prefill` less the model's work in it (the prompts' forward, the first code's sampling):
  the new rows' state set up;
- `launch`: `FastEngine._launch_frame` less the frame itself: buckets, sampling plans, the readback queued;
- `read`: `FastEngine._read_frame` less the wait for the frame: each row's bookkeeping, the stream chunks.

Tensor calls are counted as dispatched, less those that launch nothing on a GPU (views, host tensors); each is a
kernel or a copy on a GPU. A GPU run counts one more per host-to-device copy (the staging of host values),
which on the CPU is no call. Host time is measured in separate steps with nothing counting, without a device
sync (the launch cost: what the step thread spends). The model is random (`bench_engines.build_model`).

    python -m bench.profile_churn --size tiny --device cpu --rows 64 --churn 0,1,8
    python -m bench.profile_churn --size 1.7B --device cuda --rows 64 --churn 0,1,8
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import platform
import shlex
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.bench_engines import build_model, make_request
from bench.bench_http import git_commit
from bench.bench_stream_codec import card_name
from bench.tables import markdown_table
from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.prompt import prompt_for_item
from qwen_tts_server.engine.fast.runtime import resolve_sampling
from qwen_tts_server.engine.fast.sequence import Sequence
from qwen_tts_server.engine.types import Mode, SamplingParams

# Calls that only make a tensor of host data or a view of one: no kernel, no copy on a GPU. (`to` does copy when
# it changes device or dtype, and then dispatches `_to_copy`, which is counted: a host-to-device staging copy
# shows on the GPU only.)
aten = torch.ops.aten
NO_LAUNCH = {aten.slice, aten.select, aten.detach, aten.detach_, aten.view, aten.alias, aten.reshape, aten.unbind}
NO_LAUNCH |= {aten.lift_fresh, aten.unsqueeze, aten.transpose, aten.split_with_sizes, aten.chunk, aten.to}
PARTS = ("compact", "admit", "launch", "read")


class Ledger(TorchDispatchMode):
    """Counts tensor calls and host seconds per part of the step: `part(name)` opens one, a nested `part` (the
    model's work inside admission) is booked to its own name, not its parent's."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.entered: Counter[str] = Counter()
        self._open: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if self._open and func.overloadpacket not in NO_LAUNCH:
            self.calls[self._open[-1]] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self._open.append(name)
        self.entered[name] += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            self._open.pop()
            if self._open:  # the parent's clock excludes its children's
                self.seconds[self._open[-1]] -= elapsed


def booked(ledger: Ledger, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with ledger.part(name):
            return fn(*args, **kwargs)

    return run


def watch(engine: FastEngine, ledger: Ledger) -> None:
    """Book the parts of the engine's step to `ledger`, and the model's work inside them to "model"."""
    engine._compact = booked(ledger, "compact", engine._compact)
    engine._prefill = booked(ledger, "admit", engine._prefill)
    prefill = engine.runner if engine.prefill is None else engine.prefill
    prefill.prefill_many = booked(ledger, "model", prefill.prefill_many)
    engine.first_code = booked(ledger, "model", engine.first_code)
    engine._launch_frame = booked(ledger, "launch", engine._launch_frame)
    engine._run_frame = booked(ledger, "model", engine._run_frame)
    engine._read_frame = booked(ledger, "read", engine._read_frame)
    engine.readback.read = booked(ledger, "gpu_wait", engine.readback.read)  # the frame itself, on a GPU


def new_request(tts: Any, index: int, frames: int) -> Sequence:
    sampling = resolve_sampling(SamplingParams(seed=index), tts.generate_defaults)
    prompt = prompt_for_item(tts, Mode.CUSTOM_VOICE, make_request(index, 40).item)
    seq = Sequence(prompt, dataclasses.replace(sampling, min_frames=frames), max_frames=frames)
    seq.decode_audio = False  # the frames alone: the codec is not what is measured
    return seq


def turn_over(engine: FastEngine, tts: Any, churn: int, next_index: int, frames: int) -> None:
    """Cancel `churn` running requests spread over the rows, submit as many new ones, run one step."""
    running = list(engine.scheduler.running)
    stride = max(1, len(running) // max(churn, 1))
    for seq in running[::stride][:churn]:
        engine.cancel(seq)
    for i in range(churn):
        engine.submit(new_request(tts, next_index + i, frames))
    engine.step()


def measure(tts: Any, rows: int, churn: int, steps: int, *, count: bool) -> Ledger:
    """`steps` turnovers of `churn` of `rows` running requests, booked; tensor calls counted if `count`."""
    engine = FastEngine(tts, max_slots=rows, max_len=512, cuda_graphs=False, pipeline=False)
    frames = 400  # nobody ends on their own: only the turnover frees rows
    for i in range(rows):
        engine.submit(new_request(tts, i, frames))
    engine.step()
    index = rows
    for _ in range(2):  # warms the allocators up
        turn_over(engine, tts, churn, index, frames)
        index += churn
    ledger = Ledger()
    watch(engine, ledger)
    with ledger if count else contextlib.nullcontext():
        for _ in range(steps):
            turn_over(engine, tts, churn, index, frames)
            index += churn
    assert ledger.entered["compact"] == ledger.entered["launch"] == steps, ledger.entered
    return ledger


def profile(tts: Any, rows: int, churn: int, steps: int) -> list[dict[str, Any]]:
    counted = measure(tts, rows, churn, steps, count=True)
    timed = measure(tts, rows, churn, steps, count=False)  # the dispatch mode's own cost left out
    return [
        {
            "part": part,
            "rows": rows,
            "rows_turned_over": churn,
            "tensor_calls_per_step": round(counted.calls[part] / steps, 1),
            "host_us_per_step": round(1e6 * timed.seconds[part] / steps, 1),
        }
        for part in PARTS
    ]


def write_json(results: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> Path:
    now = datetime.datetime.now(datetime.timezone.utc)
    card = card_name(device)
    data = {
        "card": card,
        "date": now.strftime("%Y-%m-%d"),
        "commit": args.commit or git_commit() or "unknown",
        "command": shlex.join([Path(sys.executable).name, "-m", "bench.profile_churn", *sys.argv[1:]]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "settings": {"size": args.size, "device": str(device), "steps": args.steps},
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{data['date']}-{card.replace(' ', '-')}-churn-{data['commit']}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=64, help="running requests")
    parser.add_argument("--churn", default="0,1,8", help="requests turned over per step, comma-separated")
    parser.add_argument("--steps", type=int, default=30, help="steps measured per setting")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--commit", help="the commit to name (default: git's HEAD, '-dirty' if changed)")
    args = parser.parse_args()
    device = torch.device(args.device)
    tts = build_model(args.size, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    results = [r for churn in map(int, args.churn.split(",")) for r in profile(tts, args.rows, churn, args.steps)]
    head = ["part", "rows", "turned over", "tensor calls / step", "host us / step"]
    print(markdown_table(head, [list(r.values()) for r in results]))
    print(f"wrote {write_json(results, args, device)}")


if __name__ == "__main__":
    main()
