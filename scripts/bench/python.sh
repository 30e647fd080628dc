#!/usr/bin/env bash
# The Python package against its references, in one script on the same machine:
#   1. reading every tensor of the converted full-size CLIP ViT-B/32 (all parts) as
#      float32 numpy: modelconv.open + get_tensor(dtype="float32") vs the seed loader's
#      pyarrow read_table + frombuffer + astype (best of 5 each, interleaved);
#   2. ModelConverter.convert vs the CLI on the same input (median of 5, interleaved):
#      the binding must add nothing measurable.
# The package is built in release mode into its own venv (.cache/bench-venv).
# usage: scripts/bench/python.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="${1:-$root/.cache/bench-e2e}"
mkdir -p "$work"
"$root/scripts/setup-test-env.sh" >/dev/null
venv="$root/.cache/bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check numpy pyarrow
CARGO_TARGET_DIR="$root/target" "$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$root/python"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
[ -f "$work/clip/model.safetensors" ] || "$venv/bin/python" "$root/scripts/bench/from_manifest.py" "$root/tests/fixtures/manifests/clip-vit-base-patch32.json" "$work/clip"
"$venv/bin/python" - "$work" "$root/target/release/modelconv" <<'PY'
import statistics, subprocess, sys, time, shutil
from pathlib import Path
import numpy as np, pyarrow.parquet as pq
import modelconv

work, cli = Path(sys.argv[1]), sys.argv[2]
src, out = work / "clip", Path("/dev/shm/modelconv-bench-py")
shutil.rmtree(out, ignore_errors=True)
subprocess.run([cli, "convert", str(src), "-o", str(out), "--part", "all", "--quiet"], check=True)
TABLE = {"torch.float16": np.float16, "torch.float32": np.float32, "torch.int64": np.int64}

def ours():
    f = modelconv.open(out)
    return sum(f.get_tensor(n, dtype="float32").size for n in f.keys())

def seed():
    t = pq.read_table(out / "weights.parquet", memory_map=True)
    n = 0
    for i in range(t.num_rows):
        a = np.frombuffer(t.column("data")[i].as_buffer(), TABLE[t.column("dtype")[i].as_py()])
        n += a.reshape(t.column("shape")[i].as_py()).astype(np.float32).size
    return n

ta, tb = [], []
for _ in range(5):
    for fn, acc in ((ours, ta), (seed, tb)):
        s = time.perf_counter(); n = fn(); acc.append(time.perf_counter() - s)
print(f"read every CLIP tensor as float32 ({n:,} values): modelconv.open {min(ta):.3f}s, pyarrow+numpy {min(tb):.3f}s, ratio {min(ta)/min(tb):.2f} (goal <= 1.0)")

cfg = modelconv.ConversionConfig(force=True, validate_output=False, part="all")
tc, tp = [], []
for _ in range(5):
    shutil.rmtree(out, ignore_errors=True)
    s = time.perf_counter(); subprocess.run([cli, "convert", str(src), "-o", str(out), "--part", "all", "--quiet"], check=True); tc.append(time.perf_counter() - s)
    shutil.rmtree(out, ignore_errors=True)
    s = time.perf_counter(); r = modelconv.ModelConverter(cfg).convert(str(src), str(out)); tp.append(time.perf_counter() - s)
    assert r.success, r.error_message
shutil.rmtree(out, ignore_errors=True)
mc, mp = statistics.median(tc), statistics.median(tp)
print(f"convert full-size CLIP (all parts): CLI {mc:.3f}s, ModelConverter.convert {mp:.3f}s (medians of 5), ratio {mp/mc:.3f} (goal within 2%)")
PY
