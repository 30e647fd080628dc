#!/usr/bin/env bash
# Reader performance against pyarrow on the same file, in one script:
#   1. every tensor of a converted full-size CLIP ViT-B/32 (all parts) as f32:
#      modelconv vs pyarrow read_table + numpy frombuffer + astype(float32) (goal <= 1.0x);
#   2. open one tensor by name in the converted 4.4 GB Llama-shaped checkpoint made by
#      scripts/bench/e2e.sh (milliseconds, touching only its row group).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
work="${1:-$root/.cache/bench-e2e}"
mkdir -p "$work"
"$root/scripts/setup-test-env.sh" >/dev/null
py="$root/.venv/bin/python"
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --example read_bench
bin="$root/target/release/modelconv"
rb="$root/target/release/examples/read_bench"
if [ ! -f "$work/clip/model.safetensors" ]; then
  "$py" - "$root/tests/fixtures/manifests/clip-vit-base-patch32.json" "$work/clip" <<'PY'
import json, struct, sys
from pathlib import Path
import numpy as np
m = json.loads(Path(sys.argv[1]).read_text()); out = Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps(m["config"]))
h = m["safetensors_header"]; text = json.dumps(h); text += " " * (-len(text) % 8)
rng = np.random.default_rng(0)
with open(out / "model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(text))); f.write(text.encode())
    for name, info in sorted(((k, v) for k, v in h.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]):
        n = info["data_offsets"][1] - info["data_offsets"][0]
        if info["dtype"] == "F32":
            f.write((rng.standard_normal(n // 4, dtype=np.float32) * 0.02).tobytes())
        else:
            f.write(bytes(n))
PY
fi
"$bin" convert "$work/clip" -o "$work/clip-out" --part all --force --quiet
"$py" "$root/scripts/bench/read_pyarrow.py" "$work/clip-out/weights.parquet"
"$rb" all "$work/clip-out/weights.parquet"
if [ -f "$work/out-zstd/weights.parquet" ]; then
  "$rb" one "$work/out-zstd/weights.parquet" model.layers.11.mlp.down_proj.weight
  "$rb" one "$work/out-zstd/weights.parquet" model.layers.21.input_layernorm.weight
fi
