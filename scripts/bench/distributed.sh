#!/usr/bin/env bash
# Distributed bench: the ~4.4 GB f32 Llama-shaped checkpoint (22 layers, 3 shards), in 8
# parts of at most 300 MB, converted to f16 zstd-3 by a two-node Ray cluster on this
# machine (1 CPU per node, one task per part) against the CLI with 2 threads, alternating
# rounds, outputs on /dev/shm; then Ray's per-task cost. The Python package is installed
# into the test venv in release mode first (the tests install a dev build: rerun
# scripts/setup-test-env.sh after this).
#
#   scripts/bench/distributed.sh [WORKDIR] [ROUNDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-$root/.cache/bench-remote}"
rounds="${2:-3}"
model="$work/llama22"
[ -f "$model/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$model" 22 3
CARGO_TARGET_DIR="$root/target" MATURIN_PEP517_ARGS="--profile release" \
  "$root/.venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$root/python"
"$py" "$root/scripts/bench/distributed.py" "$bin" "$model" 300MB "$rounds"
