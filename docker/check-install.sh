#!/usr/bin/env bash
# CI for the image's install steps without a Docker engine: runs docker/install.sh (deps, then app, as the
# Dockerfile does) in a fresh temporary venv, on a copy of exactly the files the Dockerfile copies to /tmp/src,
# then checks the result: the import, `qwen-tts-server --help`, and that the local flash-attn wheel branch
# installs a wheel from the wheels folder (a stand-in wheel: the real one needs CUDA).
#
#   docker/check-install.sh
#
# Environment: PYTHON (the venv's interpreter, default python3), TORCH_INDEX_URL (passed to install.sh;
# unset here: the torch pinned in pyproject.toml from the configured index, which runs on the CPU).
# pip's configuration (pip.conf, PIP_* variables, constraints) applies as for any install here.
# The venv (about 8 GB) is deleted afterwards.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qtts-install-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

# The build context as the image sees it: every `COPY ... /tmp/src/...` line of the Dockerfile (and each of its
# sources must be let through by .dockerignore).
"$PYTHON" - "$root" "$tmp/src" <<'PY'
import shlex
import shutil
import sys
from pathlib import Path

root, dest_root = Path(sys.argv[1]), Path(sys.argv[2])
# .dockerignore sends only what it lists with `!`: every COPY source must be there, or the build misses it.
allowed = {line[1:].rstrip("/") for line in (root / ".dockerignore").read_text().splitlines() if line.startswith("!")}
copied = 0
for line in (root / "docker" / "Dockerfile").read_text().splitlines():
    if not line.startswith("COPY "):
        continue
    words = shlex.split(line)
    args = [w for w in words[1:] if not w.startswith("--")]
    *sources, dest = args
    if not dest.startswith("/tmp/src"):
        continue
    target = dest_root / dest.removeprefix("/tmp/src").lstrip("/")
    for source in sources:
        if source.rstrip("/") not in allowed:
            sys.exit(f"check-install: docker/Dockerfile copies {source}, which .dockerignore leaves out of the context")
        src = root / source
        to = target / src.name if dest.endswith("/") else target
        to.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, to, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, to)
        copied += 1
if not copied:
    sys.exit("check-install: found no COPY ... /tmp/src lines in docker/Dockerfile")
print(f"check-install: {copied} paths of the Dockerfile's build context copied to {dest_root}")
PY

# A stand-in flash-attn wheel, so the branch that installs a local wheel runs here as it does in a build.
mkdir -p "$tmp/wheels"
"$PYTHON" - "$tmp/wheels" <<'PY'
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

files = {
    "flash_attn/__init__.py": '__version__ = "0.0.0"  # stand-in of docker/check-install.sh\n',
    "flash_attn-0.0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: flash-attn\nVersion: 0.0.0\n",
    "flash_attn-0.0.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: check-install\nRoot-Is-Purelib: true\n"
    "Tag: py3-none-any\n",
}
record = []
for name, text in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(text.encode())}")
record.append("flash_attn-0.0.0.dist-info/RECORD,,")
files["flash_attn-0.0.0.dist-info/RECORD"] = "\n".join(record) + "\n"
with zipfile.ZipFile(Path(sys.argv[1]) / "flash_attn-0.0.0-py3-none-any.whl", "w") as wheel:
    for name, text in files.items():
        wheel.writestr(name, text)
PY

# The Dockerfile's two RUN steps, in its order.
export VENV=$tmp/venv PYTHON WHEELS_DIR=$tmp/wheels PIP_QUIET=${PIP_QUIET:-1} PIP_PROGRESS_BAR=off
bash "$tmp/src/docker/install.sh" deps "$tmp/src"
deps_s=$((SECONDS - start))
bash "$tmp/src/docker/install.sh" app "$tmp/src"

cd "$tmp" # not the repository root, whose qwen_tts_server/ would shadow the installed package
"$VENV/bin/python" - "$tmp/src/qwen_tts_server" <<'PY'
import sys
from pathlib import Path

import flash_attn
import qwen_tts_server
import torch

assert flash_attn.__version__ == "0.0.0", flash_attn.__file__
source, installed = Path(sys.argv[1]), Path(qwen_tts_server.__file__).parent
assert installed.is_relative_to(sys.prefix), f"imported {installed}, not the venv's package"


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


# A non-editable install, as in the image: every file of the package must be there (package-data included).
missing = sorted(files(source) - files(installed))
if missing:
    sys.exit(f"check-install: the installed package lacks {', '.join(missing)} (package-data in pyproject.toml?)")
print(
    f"check-install: qwen_tts_server {qwen_tts_server.__version__} ({len(files(source))} files), "
    f"torch {torch.__version__}, flash_attn stand-in"
)
PY
"$VENV/bin/qwen-tts-server" --help
echo "check-install: passed in $((SECONDS - start)) s (dependencies $deps_s s; venv $(du -sh "$VENV" | cut -f1))"
