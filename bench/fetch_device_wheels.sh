#!/usr/bin/env bash
# HERE (a machine with internet), in the checkout: fill DEST (default .whl, ignored by git) with every wheel
# the server and bench/bench_http.py need on the lent GPU machine beyond its image (Python 3.12, torch 2.11,
# transformers 5.17, no internet). Then name DEST in `carry` and `source bench/device_setup.sh` there.
#   DEST/common, DEST/official   ../shared/tools/device-wheels/fetch.sh: librosa stack, soundfile, sox;
#                                qwen-tts 0.1.1 + transformers 4.57.3 + tokenizers 0.22.2 + huggingface_hub 0.36.2
#   DEST/server                  the web stack (fastapi ... uvicorn, websockets, PyAV) at the versions of .venv,
#                                and this project's own wheel
#   DEST/peer, DEST/tok          only with WITH_PEER=1 / WITH_TOK=1 (tok needs PY=a python with transformers
#                                and tiktoken; see fetch.sh). The call's 64 MiB limit counts all of DEST.
# Usage: bench/fetch_device_wheels.sh [DEST]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
DEST=$(realpath -m "${1:-.whl}")
SHARED=${SHARED:-$repo/../shared/tools/device-wheels/fetch.sh}
VENV_PY=${VENV_PY:-$repo/.venv/bin/python}
PIP_PLATFORM="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

if ! git check-ignore -q "$DEST/x" 2>/dev/null; then
  echo "warning: $DEST is not ignored by git; add it to .git/info/exclude" >&2
fi

# 1. The shared groups. fetch.sh always fetches every group: keep tok from being built (it needs tiktoken)
#    unless asked, and drop peer afterwards unless asked.
placeholder=
if [ "${WITH_TOK:-0}" != 1 ] && [ ! -f "$DEST/tok/vocab.json" ]; then
  mkdir -p "$DEST/tok" && touch "$DEST/tok/vocab.json" && placeholder=1
fi
bash "$SHARED" "$DEST" >/dev/null
[ -n "$placeholder" ] && rm -rf "$DEST/tok"
[ "${WITH_PEER:-0}" = 1 ] || rm -rf "$DEST/peer"

# 2. The web stack at .venv's versions (fallbacks: the versions the server was last tested with).
declare -A FALLBACK=(
  [fastapi]=0.165.0 [starlette]=1.10.0 [pydantic]=2.14.4 [pydantic_core]=2.50.5 [pydantic-settings]=2.16.3
  [python-dotenv]=1.2.4 [python-multipart]=0.0.34 [uvicorn]=0.55.0 [annotated-types]=0.8.0
  [annotated-doc]=0.0.7 [typing-inspection]=0.4.5 [typing_extensions]=4.16.0 [opentelemetry-api]=1.45.2
  [av]=18.1.0 [websockets]=17.4 [h11]=0.16.0 [httptools]=0.9.0 [sqlalchemy]=2.1.9
)
specs=()
for name in "${!FALLBACK[@]}"; do
  version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null \
    || echo "${FALLBACK[$name]}")
  specs+=("$name==$version")
done
rm -rf "$DEST/server"
mkdir -p "$DEST/server"
# shellcheck disable=SC2086
python3 -m pip download -q $PIP_PLATFORM -d "$DEST/server" "${specs[@]}"
# This project's wheel, built from a copy of the working tree (an in-tree build would leave build/ here).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/qwen_tts_server" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
python3 -m pip wheel -q --no-deps -w "$DEST/server" "$src"

# 3. Large wheels recompressed with LZMA: the same files once installed, ~9 MB fewer to carry (repack_wheels.py).
(cd "$repo" && python3 -m bench.repack_wheels "$DEST"/*/)

echo "wheels in $DEST:"
for g in "$DEST"/*/; do printf '  %-10s %3d files %s\n' "$(basename "$g")" "$(ls "$g" | wc -l)" "$(du -sh "$g" | cut -f1)"; done
du -sh "$DEST"
