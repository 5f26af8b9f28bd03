# ON THE LENT GPU MACHINE (Python 3.12, torch 2.11 image, no internet), from the repo root, with the wheels
# of bench/fetch_device_wheels.sh carried (`carry: [".whl"]`):
#     source bench/device_setup.sh [WHEELS_DIR]   (default .whl)
# installs each wheel group into its own /tmp/site_<group> (no network, no dependency resolution) and puts
# this checkout, then the server stack, then the official qwen-tts stack and the audio libraries, on
# PYTHONPATH (the checkout first, so the code that travelled wins over the project wheel's copy; the wheel
# gives `qwen-tts-server` its package metadata). peer, if carried, goes to /tmp/site_peer, not on the path
# (bench.bench_engines --peer-pythonpath uses it). tok is a folder of tokenizer files: nothing to install.
# Then, for example:
#     python3 -m bench.checkpoint --size 1.7B --out /tmp/models
#     python3 -m bench.bench_http --models-dir /tmp/models --max-seconds 480 --out "$OUT"
# Batch jobs (a 1,000-item job against the synchronous c64 loop, event gaps, memory at unload), in one call:
#     python3 -m bench.bench_jobs --models-dir /tmp/models --max-seconds 540 --targets --no-docs \
#         --out "$OUT" --server-log "$OUT/jobs-server.log"
# Sourced (it sets PYTHONPATH in your shell): it never exits your shell, it returns non-zero on failure.

_qtts_setup() {
  local wheels=${1:-.whl} group
  if [ ! -d "$wheels" ]; then
    echo "device_setup: no wheels folder '$wheels' (carry it: run bench/fetch_device_wheels.sh here first)" >&2
    return 1
  fi
  for group in common official server peer; do
    [ -d "$wheels/$group" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "/tmp/site_$group" "$wheels/$group"/*.whl || return 1
  done
  if [ -f "$wheels/tok/tokenizer.json.gz" ] && [ ! -f "$wheels/tok/tokenizer.json" ]; then
    gunzip -k "$wheels/tok/tokenizer.json.gz" || return 1
  fi
  export PYTHONPATH="$PWD:/tmp/site_server:/tmp/site_official:/tmp/site_common${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  # Without the server group (the peers' call: bench.peers), only what bench_engines imports.
  local out stack="fastapi, uvicorn, websockets, av, httpx, transformers, qwen_tts, qwen_tts_server"
  [ -d "$wheels/server" ] || stack="transformers, qwen_tts, bench.bench_engines"
  out=$(python3 -c "import $stack; \
print('device_setup: python', __import__('sys').version.split()[0], '| torch', __import__('torch').__version__, \
'| transformers', transformers.__version__)" 2>&1) || {
    echo "$out" >&2
    return 1
  }
  echo "$out" | grep "^device_setup:"
}
_qtts_setup "$@"
