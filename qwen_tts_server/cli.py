"""Command line: `serve`, `worker`, `synth`, `models`, `make-test-models`.

Flags override the matching `QTTS_*` environment variables. A failing command prints one line,
`error: <what went wrong>`, on stderr and exits with status 1 (2 for a usage error), never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import Settings
from .errors import ServiceError

log = logging.getLogger("qwen_tts_server.cli")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key, value in {
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "models_dir": getattr(args, "models_dir", None),
            "data_dir": getattr(args, "data_dir", None),
            "device": getattr(args, "device", None),
            "devices": getattr(args, "devices", None),
            "dtype": getattr(args, "dtype", None),
            "broker_url": getattr(args, "broker", None),
            "job_concurrency": getattr(args, "concurrency", None),
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
    if settings.devices:
        from .engine.pool import check_devices

        check_devices(settings.devices)  # a GPU this host lacks: one line now, not a failed start-up later
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = f"http://{host}:{settings.port}"
    everywhere = " (all interfaces)" if settings.host in ("0.0.0.0", "::") else ""
    log.info(f"qwen-tts-server {__version__} listening on {base}{everywhere}; API docs at {base}/docs")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A GPU worker of the job pool: consumes items from the broker until interrupted."""
    from .jobs.worker import run_worker
    from .logs import configure_logging

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_json)
    if not settings.broker_url:
        _error("worker needs a broker: set QTTS_BROKER_URL (or --broker), e.g. redis://127.0.0.1:6379/0")
        return 2
    run_worker(settings, loglevel=settings.log_level)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """One-off synthesis through the same app (validation, engine, encoding) without a server."""
    from fastapi.testclient import TestClient

    from .api.app import create_app

    settings = _settings(args)
    body: dict[str, object] = {"text": args.text, "language": args.language, "response_format": args.format}
    if args.model:
        body["model"] = args.model
    _download_if_missing(settings, args.model or _default_model(settings, args.mode))
    if args.mode == "custom-voice":
        body["speaker"] = args.speaker
    if args.instruct:
        body["instruct"] = args.instruct
    if args.mode == "voice-clone":
        if not args.ref_audio:
            _error("voice-clone needs --ref-audio")
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
        error = response.json().get("error", {})
        field = f" (field: {error['field']})" if error.get("field") else ""
        _error(f"{error.get('message', response.text)}{field}")
        return 1
    item = response.json()["items"][0]
    Path(args.out).write_bytes(base64.b64decode(item["audio_base64"]))
    print(f"wrote {args.out}: {item['duration_s']:.2f} s at {item['sample_rate']} Hz")
    return 0


def _default_model(settings: Settings, mode: str) -> str:
    return {
        "custom-voice": settings.default_custom_voice_model,
        "voice-design": settings.default_voice_design_model,
        "voice-clone": settings.default_voice_clone_model,
    }[mode]


def _download_if_missing(settings: Settings, name: str) -> None:
    """Fetch a known model that is not on disk yet, with the hub's progress bars (the server would
    answer 503 while it downloads in the background)."""
    from .engine.registry import ModelRegistry

    registry = ModelRegistry(settings)
    key = registry.key(name)
    if not registry.is_local(key) and settings.download_source != "none":
        print(f"downloading {key} from {settings.download_source} ({settings.hub_org}/{key})", file=sys.stderr)
        registry.download(key)


def cmd_models(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .engine.registry import ModelRegistry

    settings = _settings(args)
    registry = ModelRegistry(settings)
    if args.action == "list":
        for status in registry.statuses():
            print(json.dumps(dataclasses.asdict(status)))
        return 0
    key = registry.key(args.name)  # an unknown name fails here, before any hub is asked
    if not registry.is_local(key) and settings.download_source != "none":
        print(f"downloading {key} from {settings.download_source} ({settings.hub_org}/{key})", file=sys.stderr)
    print(registry.download(key))
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
    serve.add_argument(
        "--devices",
        help="several devices of this host, e.g. cuda:0,cuda:1: one engine each, requests to the least-loaded "
        "(QTTS_DEVICES; overrides --device)",
    )
    common(serve)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run job items from the broker on one device (one worker per GPU)")
    worker.add_argument("--broker", help="Celery broker URL, e.g. redis://127.0.0.1:6379/0 (QTTS_BROKER_URL)")
    worker.add_argument(
        "--concurrency", type=int, help="items run at once (QTTS_JOB_CONCURRENCY; default: the engine's rows)"
    )
    common(worker)
    worker.set_defaults(func=cmd_worker)

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

    models = sub.add_parser("models", help="list the known models, or download one (resolve: the same)")
    models.add_argument("action", choices=["list", "download", "resolve"])
    models.add_argument("name", nargs="?", help="model name, e.g. Qwen3-TTS-12Hz-1.7B-Base")
    common(models)
    models.set_defaults(func=cmd_models)

    make = sub.add_parser("make-test-models", help="write tiny random checkpoints under DIR")
    make.add_argument("dir")
    make.set_defaults(func=cmd_make_test_models)
    return parser


def _error(message: str) -> None:
    """One line on stderr, however many lines the message had."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "action", None) in ("download", "resolve") and not args.name:
        _error(f"models {args.action} needs a NAME")
        return 2
    try:
        if args.command in ("serve", "worker", "synth", "make-test-models"):
            from .logs import import_upstream_quietly

            import_upstream_quietly()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing, and let exit not complain either
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ServiceError as exc:
        _error(exc.message)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or type(exc).__name__}{where}")
    except Exception as exc:
        _error(f"{type(exc).__name__}: {exc}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
