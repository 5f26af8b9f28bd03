#!/usr/bin/env bash
# The GPU test tier (tests/gpu, `pytest -m gpu`), unattended, in bounded time. `make test-gpu` runs it on a
# CUDA box with the venv; on the lent GPU machine run it in the same call as the benchmark, after
# `source bench/device_setup.sh` (carry .whl, with .whl/test from bench/fetch_test_wheels.sh):
#     bash bench/gpu_tests.sh
# 1. prints the running versions against bench/versions.txt (a mismatch is a warning: numbers from other
#    versions are not comparable, but the tests still run);
# 2. writes the full-size random 1.7B checkpoint to $QTTS_GPU_TEST_MODELS (default /tmp/models, the folder the
#    benchmarks use) unless it is there (bench.checkpoint, ~1 min); QTTS_GPU_TEST_BUILD=0 skips that, and the
#    tests then fall back, smaller, to the tiny checkpoints;
# 3. runs pytest -m gpu tests/gpu -s, stopped after $QTTS_GPU_TEST_TIMEOUT_S (default 480) so the call
#    returns with what was measured. Results JSON: $QTTS_GPU_TEST_RESULTS, else $OUT/gpu-tests-<date>.json on
#    the device, else bench/results/gpu-tests-<date>.json. Extra arguments go to pytest (e.g. -k graph).
# Exit status: pytest's (124 on the time-out).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export QTTS_GPU_TEST_MODELS=${QTTS_GPU_TEST_MODELS:-/tmp/models}
if [ -z "${QTTS_GPU_TEST_RESULTS:-}" ] && [ -n "${OUT:-}" ]; then
  export QTTS_GPU_TEST_RESULTS="$OUT/gpu-tests-$(date +%F).json"
fi

if ! "$PY" -c "import pytest" 2>/dev/null; then
  if ! ls .whl/test/*.whl >/dev/null 2>&1; then
    echo "gpu_tests: $PY has no pytest and there is no .whl/test (run bench/fetch_test_wheels.sh and carry .whl)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_test .whl/test/*.whl || exit 2
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/site_test"
fi

"$PY" -m bench.versions
has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
model="$QTTS_GPU_TEST_MODELS/Qwen3-TTS-12Hz-1.7B-CustomVoice"
if [ "$has_cuda" = 1 ] && [ "${QTTS_GPU_TEST_BUILD:-1}" != 0 ] && [ ! -f "$model/config.json" ]; then
  echo "gpu_tests: writing the full-size random 1.7B checkpoint to $QTTS_GPU_TEST_MODELS"
  "$PY" -m bench.checkpoint --size 1.7B --out "$QTTS_GPU_TEST_MODELS" || exit 3
fi

timeout -s INT -k 30 "${QTTS_GPU_TEST_TIMEOUT_S:-480}" \
  "$PY" -m pytest -m gpu tests/gpu -s -p no:cacheprovider -o console_output_style=classic "$@"
status=$?
[ "$status" = 124 ] && echo "gpu_tests: stopped after ${QTTS_GPU_TEST_TIMEOUT_S:-480} s" >&2
exit "$status"
