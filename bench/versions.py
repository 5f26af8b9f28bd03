"""The versions the GPU numbers come from (bench/versions.txt), against the versions running now.

`python -m bench.versions` prints both and says which differ (a warning: numbers measured on other versions
are not comparable, but nothing stops). The GPU tier (tests/gpu) records `report()` in its results JSON; a
benchmark script can do the same with one line.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

VERSIONS_FILE = Path(__file__).with_name("versions.txt")


def pinned(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """`name=version` lines of versions.txt (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("=")
            out[name.strip()] = version.strip()
    return out


def running() -> dict[str, str | None]:
    """The same names, as installed in this interpreter (None: not importable)."""

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": None, "cuda": None}
    try:
        import torch

        out["torch"], out["cuda"] = torch.__version__, torch.version.cuda
    except ImportError:
        pass
    out["transformers"] = dist("transformers")
    out["qwen-tts"] = dist("qwen-tts")
    return out


def report() -> dict[str, object]:
    """Pinned, running, and the names whose versions differ (CPU runs differ by design: torch 2.9.1)."""
    want, have = pinned(), running()
    return {
        "pinned": want,
        "running": have,
        "differs": sorted(name for name, version in want.items() if have.get(name) != version),
    }


def main() -> int:
    want, have = pinned(), running()
    for name, version in want.items():
        mark = "" if have.get(name) == version else "   <- differs"
        print(f"versions: {name:13s} measured {version:16s} running {have.get(name)}{mark}", flush=True)
    if any(have.get(name) != version for name, version in want.items()):
        print(
            "versions: WARNING: not the versions the published GPU numbers come from (bench/versions.txt); "
            "results are not directly comparable",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
