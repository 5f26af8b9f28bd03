#!/usr/bin/env bash
# Run a bench module against another copy of the package, for an A/B on one machine (one device call):
#     git archive <sha> qwen_tts_server | tar -x -C ab/base      # here; carry ab/ (keep it ignored)
#     bench/run_variant.sh ab/base bench.profile_step --graphs-only --batches 1,64 --compile on
# `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: run from the checkout, the
# checkout's package wins whatever PYTHONPATH says. So the module runs from DIR, with DIR's package first and
# the checkout after it (for bench/ and anything DIR lacks).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath "$1")
shift
[ -d "$dir/qwen_tts_server" ] || { echo "run_variant: no qwen_tts_server/ in $dir" >&2; exit 2; }
cd "$dir"
PYTHONPATH="$dir:$repo${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m "$@"
