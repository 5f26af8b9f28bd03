#!/usr/bin/env bash
# The image's install steps, in one script: the Dockerfile RUNs it, and CI runs the very same script in a
# plain virtual environment (docker/check-install.sh), so a step that breaks fails CI before any image build.
#
#   docker/install.sh [deps|app|all] [SRC]     (default: all; SRC: the source tree, default: this repo)
#
#   deps  a venv at $VENV, torch/torchaudio at the project's pins (from $TORCH_INDEX_URL when set), the other
#         dependencies of pyproject.toml (and of the extras in $QTTS_EXTRAS), and flash-attn when a wheel
#         flash_attn-*.whl lies in $WHEELS_DIR. Needs only pyproject.toml: the Dockerfile runs it before it
#         copies the code, so a code change does not reinstall PyTorch.
#   app   the package itself (no dependencies: `deps` brought them), then a smoke check: `pip check`, the
#         import, `qwen-tts-server --help`.
#
# Environment:
#   VENV             the venv to create or reuse (default /opt/venv)
#   PYTHON           the interpreter that creates it (default python3; 3.11 or newer, for tomllib)
#   TORCH_INDEX_URL  index of the torch build, e.g. https://download.pytorch.org/whl/cu128 (or .../cpu);
#                    unset: the default index, whose Linux x86_64 torch is a CUDA 12.8 build that also runs
#                    on the CPU
#   WHEELS_DIR       where a local flash-attn wheel is looked for (default SRC/docker/wheels). It must match
#                    the image's Python, torch and CUDA: one that does not import fails the install.
#   QTTS_EXTRAS      comma-separated extras of pyproject.toml to install too (e.g. modelscope)
# pip's own configuration (pip.conf, PIP_* variables) applies to every pip call.
set -euo pipefail

phase=${1:-all}
src=$(cd "${2:-$(dirname "$0")/..}" && pwd)
VENV=${VENV:-/opt/venv}
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
WHEELS_DIR=${WHEELS_DIR:-$src/docker/wheels}
QTTS_EXTRAS=${QTTS_EXTRAS:-}

case $phase in deps | app | all) ;; *)
    echo "usage: $0 [deps|app|all] [SRC]" >&2
    exit 2
    ;;
esac

step() { echo "==> install.sh: $*"; }

venv_python() {
    if [[ ! -x $VENV/bin/python ]]; then
        step "creating the venv $VENV with $($PYTHON --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
}

pip() { "$VENV/bin/python" -m pip "$@"; }

install_deps() {
    venv_python
    pip install --upgrade pip
    local reqs
    reqs=$(mktemp)
    # The dependencies as pyproject.toml pins them (the single place pins live), plus those of the extras.
    "$VENV/bin/python" - "$src/pyproject.toml" "$QTTS_EXTRAS" >"$reqs" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
requirements = list(project["dependencies"])
for extra in filter(None, (e.strip() for e in sys.argv[2].split(","))):
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
PY
    local torch_pins
    torch_pins=$(grep -E '^torch(audio)?[ =<>!~]' "$reqs" || true)
    if [[ -n $TORCH_INDEX_URL ]]; then
        # That index serves torch's own dependencies too (nvidia-*, triton, ...).
        step "torch from $TORCH_INDEX_URL: ${torch_pins//$'\n'/ }"
        # shellcheck disable=SC2086 # one pin a word
        pip install --index-url "$TORCH_INDEX_URL" $torch_pins
    fi
    step "dependencies of pyproject.toml${QTTS_EXTRAS:+ and [$QTTS_EXTRAS]}"
    pip install -r "$reqs"
    rm -f "$reqs"

    shopt -s nullglob
    local wheels=("$WHEELS_DIR"/flash_attn-*.whl)
    shopt -u nullglob
    if ((${#wheels[@]})); then
        step "flash-attn from ${wheels[*]}"
        # pip picks the one wheel that fits this Python and platform; torch and einops are already there.
        pip install --no-index --find-links "$WHEELS_DIR" --no-deps flash-attn
        if ! (cd / && "$VENV/bin/python" -c "import flash_attn"); then
            echo "install.sh: the flash-attn wheel in $WHEELS_DIR does not import with this Python and torch" \
                "($("$VENV/bin/python" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)'))." \
                "Use a wheel built for them, or remove it (the server then uses PyTorch's SDPA attention)." >&2
            exit 1
        fi
    else
        step "no flash_attn-*.whl in $WHEELS_DIR: flash-attn not installed (attention runs on PyTorch's SDPA)"
    fi
}

install_app() {
    venv_python
    step "qwen-tts-server from $src"
    pip install --no-deps "$src"
    step "smoke check"
    pip check
    # From / : a source tree in the working directory would shadow the installed package.
    (cd / && "$VENV/bin/python" -c "import qwen_tts_server; print('qwen_tts_server', qwen_tts_server.__version__)")
    "$VENV/bin/qwen-tts-server" --help >/dev/null
}

if [[ $phase == deps || $phase == all ]]; then install_deps; fi
if [[ $phase == app || $phase == all ]]; then install_app; fi
step "done ($phase)"
