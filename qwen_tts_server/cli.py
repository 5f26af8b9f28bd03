"""Command line: `serve`, `synth`, `models`, `make-test-models`.

Flags override the matching `QTTS_*` environment variables.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from .config import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key, value in {
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "models_dir": getattr(args, "models_dir", None),
            "data_dir": getattr(args, "data_dir", None),
            "device": getattr(args, "device", None),
            "dtype": getattr(args, "dtype", None),
        }.items()
        if value is not None
    }
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .logs import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """One-off synthesis through the same app (validation, engine, encoding) without a server."""
    from fastapi.testclient import TestClient

    from .api.app import create_app

    settings = _settings(args)
    body: dict[str, object] = {"text": args.text, "language": args.language, "response_format": args.format}
    if args.model:
        body["model"] = args.model
    if args.mode == "custom-voice":
        body["speaker"] = args.speaker
    if args.instruct:
        body["instruct"] = args.instruct
    if args.mode == "voice-clone":
        if not args.ref_audio:
            print("error: voice-clone needs --ref-audio", file=sys.stderr)
            return 2
        body["ref_audio"] = base64.b64encode(Path(args.ref_audio).read_bytes()).decode("ascii")
        body["ref_text"] = args.ref_text
        body["x_vector_only"] = args.x_vector_only
    if args.seed is not None:
        body["seed"] = args.seed
    body["return_audio_inline"] = True
    with TestClient(create_app(settings)) as client:
        response = client.post(f"/api/v1/{args.mode}", json=body)
    if response.status_code != 200:
        print(json.dumps(response.json(), indent=2), file=sys.stderr)
        return 1
    item = response.json()["items"][0]
    Path(args.out).write_bytes(base64.b64decode(item["audio_base64"]))
    print(f"wrote {args.out}: {item['duration_s']:.2f} s at {item['sample_rate']} Hz")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import dataclasses

    from .engine.registry import ModelRegistry

    registry = ModelRegistry(_settings(args))
    if args.action == "list":
        for status in registry.statuses():
            print(json.dumps(dataclasses.asdict(status)))
        return 0
    path = registry.resolve(args.name)
    print(path)
    return 0


def cmd_make_test_models(args: argparse.Namespace) -> int:
    from .testing.tiny_models import build_all

    for path in build_all(Path(args.dir)):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-tts-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models-dir", type=Path, help="checkpoints folder (QTTS_MODELS_DIR)")
        p.add_argument("--data-dir", type=Path, help="files and their index (QTTS_DATA_DIR)")
        p.add_argument("--device", help="auto | cpu | cuda | cuda:N (QTTS_DEVICE)")
        p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    common(serve)
    serve.set_defaults(func=cmd_serve)

    synth = sub.add_parser("synth", help="synthesize one utterance to a file")
    synth.add_argument("mode", choices=["custom-voice", "voice-design", "voice-clone"])
    synth.add_argument("--text", required=True)
    synth.add_argument("--out", required=True)
    synth.add_argument("--model")
    synth.add_argument("--language", default="auto")
    synth.add_argument("--speaker", default="vivian")
    synth.add_argument("--instruct")
    synth.add_argument("--ref-audio")
    synth.add_argument("--ref-text")
    synth.add_argument("--x-vector-only", action="store_true")
    synth.add_argument("--seed", type=int)
    synth.add_argument("--format", default="wav", choices=["wav", "flac", "mp3", "opus", "pcm"])
    common(synth)
    synth.set_defaults(func=cmd_synth)

    models = sub.add_parser("models", help="list models, or resolve (find or download) one")
    models.add_argument("action", choices=["list", "resolve"])
    models.add_argument("name", nargs="?")
    common(models)
    models.set_defaults(func=cmd_models)

    make = sub.add_parser("make-test-models", help="write tiny random checkpoints under DIR")
    make.add_argument("dir")
    make.set_defaults(func=cmd_make_test_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) == "resolve" and not args.name:
        print("error: models resolve needs a NAME", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
