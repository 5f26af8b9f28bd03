#!/usr/bin/env bash
# HERE (a machine with internet), in the checkout: put pytest and what it imports, as wheels for the lent GPU
# machine's Python 3.12, into DEST/test (default .whl/test, beside bench/fetch_device_wheels.sh's groups), at
# the versions of .venv. bench/gpu_tests.sh installs them there (to /tmp/site_test) when its python lacks pytest.
# Usage: bench/fetch_test_wheels.sh [DEST]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
DEST=$(realpath -m "${1:-$repo/.whl}")
VENV_PY=${VENV_PY:-$repo/.venv/bin/python}
specs=()
for name in pytest pluggy iniconfig packaging pygments; do
  version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  specs+=("$name==$version")
done
rm -rf "$DEST/test"
mkdir -p "$DEST/test"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d "$DEST/test" "${specs[@]}"
echo "wheels in $DEST/test: $(ls "$DEST/test" | tr '\n' ' ')"
