#!/usr/bin/env bash
# --quantize int8 against the f16 conversion of the same input, in one script: the
# ~4.4 GB f32 Llama-shaped checkpoint (22 layers, 3 shards) and the ~13.5 GB bf16
# Llama-2-7B-shaped one (32 layers), output on /dev/shm; wall time (best of two,
# interleaved), peak RSS (/usr/bin/time -v), output size; then the quantization report
# (model-wide SQNR, worst tensors) of each.
# usage: scripts/bench/quant.sh [WORKDIR] [--skip-7b]   (needs ~20 GB of disk, ~8 GB of /dev/shm)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-}"
out="/dev/shm/modelconv-bench-quant"
[ -f "$work/llama22/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama22" 22 3 --f16-raw "$work/llama22.f16"
models=(llama22)
if [[ "${2:-}" != "--skip-7b" ]]; then
  [ -f "$work/llama7b/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama7b" 32 5 --7b --bf16
  models+=(llama7b)
fi
for m in "${models[@]}"; do
  cat "$work/$m"/*.safetensors >/dev/null
  f=(); q=(); rss_f=0; rss_q=0; size_f=0; size_q=0
  for round in 1 2; do
    rm -rf "$out"; read -r t r _ < <(secs "$bin" convert "$work/$m" -o "$out" --quiet); f+=("$t"); rss_f=$r
    size_f="$(stat -c %s "$out/weights.parquet")"
    rm -rf "$out"; read -r t r _ < <(secs "$bin" convert "$work/$m" -o "$out" --quiet --quantize int8); q+=("$t"); rss_q=$r
    size_q="$(stat -c %s "$out/weights.parquet")"
  done
  tf="$(best "${f[@]}")"; tq="$(best "${q[@]}")"
  src="$(du -cb "$work/$m"/*.safetensors | tail -1 | awk '{printf "%.2f", $1/1e9}')"
  echo "$m ($src GB): f16 ${tf}s, peak RSS $((rss_f / 1024)) MiB, $((size_f / 1048576)) MiB | int8 ${tq}s ($(ratio "$tq" "$tf")× the f16 time; goal <= 1.2), peak RSS $((rss_q / 1024)) MiB, $((size_q / 1048576)) MiB ($(ratio "$size_q" "$size_f")× the f16 size)"
  "$py" -c "
import json; q = json.load(open('$out/metadata.json'))['quantization']; m = q['model']
print(f\"  {q['quantized_tensors']} tensors int8, {q['unquantized_tensors']} kept: SQNR {m['sqnr_db']:.1f} dB, relative RMS {m['rel_rms']:.2e}; worst: \" +
      ', '.join(f\"{t['name']} {t['sqnr_db']:.1f} dB\" for t in q['tensors'][:3]))"
done
rm -rf "$out"
