#!/usr/bin/env bash
# The end-to-end table (scripts/bench/e2e.py): every figure beside its reference run in
# the same script, medians of rounds (each in its own shuffled order, after a warm-up
# round). Conversions of the ~4.4 GB f32 Llama-shaped checkpoint (22 layers, 3 shards)
# to /dev/shm: f16 zstd-3 vs
# `zstd -T<cores> -3` on the same f16 bytes (wall and system time), 1 vs all threads
# against zstd's own scaling, `--compression none` vs `cp`, PyTorch `.bin` vs
# safetensors, `--io read` vs mmap, `--quantize int8` vs f16, the f16 conversion's and
# zstd's kernel time sampled by `perf record` (where perf works), the Python package's
# convert vs the CLI; the same f16 conversion to disk vs `zstd && sync`; reading every
# tensor of full-size CLIP as f32 through Python, the library and pyarrow.
# usage: scripts/bench/e2e.sh [WORKDIR] [ROUNDS=3]
#   (needs ~15 GB of disk, ~3 GB of /dev/shm, zstd; the first run generates the inputs
#   and builds the Python package in release mode into .cache/bench-venv)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-}"
rounds="${2:-3}"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --example read_bench
[ -f "$work/llama22/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama22" 22 3 --f16-raw "$work/llama22.f16"
[ -f "$work/llama22-bin/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama22-bin" 22 3 --bin
[ -f "$work/clip/model.safetensors" ] || "$py" "$root/scripts/bench/from_manifest.py" "$root/tests/fixtures/manifests/clip-vit-base-patch32.json" "$work/clip"
venv="$root/.cache/bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import numpy, pyarrow" 2>/dev/null || "$venv/bin/pip" install --quiet --disable-pip-version-check numpy pyarrow
CARGO_TARGET_DIR="$root/target" "$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$root/python"
# Other files in the page cache (the 13.5 GB 7B checkpoint of quant.sh, say) make the
# kernel reclaim while the runs allocate, which shows as noisy system time: as root,
# drop the cache first, then read in just the inputs.
sync; echo 1 2>/dev/null >/proc/sys/vm/drop_caches || true
cat "$work"/llama22/*.safetensors "$work"/llama22-bin/*.bin "$work/llama22.f16" >/dev/null
"$py" "$root/scripts/bench/e2e.py" "$work" "$bin" "$root/target/release/examples/read_bench" "$venv/bin/python" "$rounds"
