"""Write a full-size random Qwen3-TTS-12Hz checkpoint in the published on-disk layout.

The real server then loads it from disk through its real loading code (upstream `from_pretrained`),
like a downloaded checkpoint: `<out>/<published name>/` with

* `model.safetensors`: the model's weights in bf16 (as published), built by `bench_engines.build_model`
  (published hyper-parameters, random weights: linear/embedding N(0, 0.02), conv N(0, 1/fan_in));
* `speech_tokenizer/model.safetensors`: the 12 Hz codec's weights in fp32 (as published), built by
  `bench_engines.build_speech_tokenizer`;
* `config.json` and `speech_tokenizer/config.json` from `bench_engines.model_config` /
  `speech_tokenizer_config` (full-size hyper-parameters, published tables and special ids), and the
  generation, preprocessor and tokenizer files exactly as `testing.tiny_models` writes them.

Text tokenizer: tiny_models' byte-level BPE by default. It has the published vocabulary size and special
ids (so the text embedding and every special position are the real ones), and the benchmark's words take
about one token each, as with the real tokenizer; only rare words split differently. `--tokenizer-dir`
copies a full one instead (e.g. `.whl/tok` from shared/tools/device-wheels/fetch.sh; a `tokenizer.json.gz`
there is unpacked), and `assistant_token_id` is then taken from its vocabulary.

`--size tiny` writes tiny_models' tiny checkpoint (CPU tests), with plain random weights by default
(`--frames-per-token` gives it the weights-only EOS clock instead), so that, as with the full-size ones,
`max_new_tokens` sets every request's length.

A 1.7B checkpoint is ~4.5 GB; built on the GPU it takes well under a minute, most of it writing:
    python -m bench.checkpoint --size 1.7B --out /tmp/models
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _save_safetensors(module: Any, path: Path, dtype: Any | None) -> int:
    """Write `module`'s state dict (floating tensors cast to `dtype`, if given) to `path`; returns bytes."""
    from safetensors.torch import save_file

    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in module.state_dict().items()
    }
    save_file(state, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def _copy_tokenizer(src: Path, dest: Path) -> dict[str, int]:
    """Copy a full text tokenizer's files into `dest`; returns its vocabulary (for the token ids)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dest / name)
            copied.append(name)
        elif (src / f"{name}.gz").exists():
            with gzip.open(src / f"{name}.gz", "rb") as fin, open(dest / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            copied.append(name)
    if "vocab.json" not in copied or "tokenizer_config.json" not in copied:
        raise SystemExit(f"{src}: no vocab.json / tokenizer_config.json (a Qwen2 tokenizer folder is needed)")
    return json.loads((dest / "vocab.json").read_text(encoding="utf-8"))


def write_checkpoint(
    out_dir: Path | str,
    size: str = "1.7B",
    kind: str = "custom_voice",
    *,
    device: str | None = None,
    tokenizer_dir: Path | str | None = None,
    seed: int = 0,
    frames_per_token: float | None = None,
    log: Any = print,
) -> Path:
    """Write `<out_dir>/<published name>/` for `size` (1.7B, 0.6B or tiny) and return it.

    Assembled beside the target and renamed into place, so a server scanning `out_dir` never sees
    half a checkpoint. `frames_per_token` applies to `tiny` only (tiny_models' EOS clock; None: none).
    """
    from bench.bench_engines import published_name
    from qwen_tts_server.testing import tiny_models

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = published_name(size, kind)
    if size == "tiny":
        if tokenizer_dir is not None:
            raise ValueError("--tokenizer-dir is for the full sizes; tiny checkpoints use the tiny tokenizer")
        return tiny_models.build_tiny_checkpoint(out_dir, name, seed=seed, frames_per_token=frames_per_token)

    import torch

    from bench.bench_engines import build_model, build_speech_tokenizer, model_config, speech_tokenizer_config

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Built in the dtype it is saved in: bf16 talker, fp32 codec (what from_pretrained gets from disk).
    model_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    target = out_dir / name
    work = out_dir / f".{name}.building-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    (work / "speech_tokenizer").mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        codec = build_speech_tokenizer(size, dev, torch.float32, seed + 1)
        tts = build_model(size, kind, dev, model_dtype, seed=seed, speech_tokenizer=codec)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        params = sum(p.numel() for p in tts.model.parameters())
        log(f"built {name} ({params / 1e6:.0f}M parameters) on {dev} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        model_bytes = _save_safetensors(tts.model, work / "model.safetensors", torch.bfloat16)
        codec_bytes = _save_safetensors(codec.model, work / "speech_tokenizer" / "model.safetensors", torch.float32)
        log(
            f"wrote weights: model {model_bytes / 1e9:.2f} GB (bf16), speech tokenizer {codec_bytes / 1e9:.2f} GB "
            f"(fp32) in {time.perf_counter() - t0:.1f} s"
        )
        del tts, codec
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        config = model_config(size, kind)
        if tokenizer_dir is not None:
            vocab = _copy_tokenizer(Path(tokenizer_dir), work)
            config["assistant_token_id"] = vocab["assistant"]
        else:
            for file_name, data in tiny_models.tokenizer_files().items():
                (work / file_name).write_bytes(data)
        write = tiny_models._write_json
        write(work / "config.json", config)
        write(work / "generation_config.json", tiny_models.GENERATION_CONFIG)
        write(work / "preprocessor_config.json", tiny_models.PREPROCESSOR)
        write(work / "speech_tokenizer" / "config.json", speech_tokenizer_config(size))
        write(work / "speech_tokenizer" / "configuration.json", tiny_models.SPEECH_TOKENIZER_CONFIGURATION)
        write(work / "speech_tokenizer" / "preprocessor_config.json", tiny_models.SPEECH_TOKENIZER_PREPROCESSOR)
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="models folder; the checkpoint goes to OUT/<published name>")
    p.add_argument("--size", default="1.7B", choices=["1.7B", "0.6B", "tiny"])
    p.add_argument("--kind", default="custom_voice", choices=["custom_voice", "voice_design", "base"])
    p.add_argument("--device", default=None, help="where to build it (default cuda if available, else cpu)")
    p.add_argument("--tokenizer-dir", default=None, help="a full Qwen2 text tokenizer folder (default: tiny one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames-per-token", type=float, default=None, help="tiny only: the weights-only EOS clock")
    p.add_argument("--force", action="store_true", help="rewrite it even if OUT/<name>/config.json exists")
    args = p.parse_args(argv)

    from bench.bench_engines import published_name

    target = Path(args.out) / published_name(args.size, args.kind)
    if (target / "config.json").exists() and not args.force:
        print(f"{target} exists (--force rewrites it)")
        return 0
    t0 = time.perf_counter()
    path = write_checkpoint(
        args.out,
        args.size,
        args.kind,
        device=args.device,
        tokenizer_dir=args.tokenizer_dir,
        seed=args.seed,
        frames_per_token=args.frames_per_token,
    )
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
