#!/usr/bin/env bash
# Integer codes carried into V2: the bench's 1.1B Llama layout (22 layers, 3 shards) as
# GPTQ 4-bit (group 128, F16 scales), compressed-tensors W4A16 (pack-quantized, group
# 32, BF16 scales) and ModelOpt NVFP4 (E2M1 pairs, E4M3 scales per 16), each converted
#
#   f16       `convert` (the reference run beside it: the same checkpoint dequantized)
#   int8      `convert --quantize int8`, the command a user runs: the codes carried,
#             the embeddings and the LM head (not pre-quantized) quantized from floats
#   lossless  `convert --quantize int8 --lossless`: the codes carried, no quantization
#             error anywhere (the embeddings, norms and the LM head stay f16)
#
# in alternating runs with the output on the RAM disk (removed before every run).
# Prints medians of wall time, peak RSS and output bytes, and each mode's ratios to f16.
# Then the error column: the carried file's SQNR from its report (`exact` when the
# seed loader's formula gives the source's values bit for bit) against the SQNR of
# re-quantizing the same values as `--quantize int8` did before codes were carried
# (the checkpoint dequantized to f32, exported, and quantized again).
#
# nvfp4-real is NVFP4 quantized from normal weights (make_prequant.py): its codes are
# distributed as trained weights give them, where nvfp4's are uniform bytes.
#
#   scripts/bench/carry.sh [WORKDIR] [ROUNDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-$root/.cache/bench-prequant}"
rounds="${2:-3}"
schemes=(gptq ct nvfp4 nvfp4-real)
for s in "${schemes[@]}"; do
  [ -f "$work/$s/config.json" ] || "$py" "$root/scripts/bench/make_prequant.py" "$work/$s" 22 3 "$s"
done
shm=/dev/shm/modelconv-carry
declare -A wall rss size
modes=(f16 int8 lossless)
for r in $(seq 1 "$rounds"); do
  cat "$work"/*/*.safetensors >/dev/null
  for s in "${schemes[@]}"; do
    for m in "${modes[@]}"; do
      rm -rf "$shm"
      args=()
      [ "$m" = int8 ] && args=(--quantize int8)
      [ "$m" = lossless ] && args=(--quantize int8 --lossless)
      read -r w k _ < <(secs "$bin" convert "$work/$s" -o "$shm" --threads 2 --quiet "${args[@]}")
      wall[$s-$m]="${wall[$s-$m]:-} $w"
      rss[$s-$m]="${rss[$s-$m]:-} $k"
      size[$s-$m]=$(stat -c %s "$shm/weights.parquet")
    done
  done
done
rm -rf "$shm"
med() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-6s %-9s %8s %7s %8s %7s %9s %7s\n' scheme mode time_s ratio rss_MiB ratio out_MB ratio
for s in "${schemes[@]}"; do
  fw=$(echo "${wall[$s-f16]}" | med); fr=$(echo "${rss[$s-f16]}" | med); fs=${size[$s-f16]}
  for m in "${modes[@]}"; do
    w=$(echo "${wall[$s-$m]}" | med); k=$(echo "${rss[$s-$m]}" | med); b=${size[$s-$m]}
    printf '%-6s %-9s %8s %7s %8s %7s %9s %7s\n' "$s" "$m" "$w" "$(ratio "$w" "$fw")" \
      "$((k / 1024))" "$(ratio "$k" "$fr")" "$((b / 1000000))" "$(ratio "$b" "$fs")"
  done
done
# The error column: carried against re-quantized.
sqnr() { "$py" -c 'import json,sys; q=json.load(sys.stdin)["quantization"]; m=q["model"]; print("exact" if m["sqnr_db"] is None else "%.1f dB" % m["sqnr_db"], q["quantized_tensors"])'; }
printf '\n%-6s %22s %26s\n' scheme "carried: SQNR, tensors" "re-quantized: SQNR, tensors"
for s in "${schemes[@]}"; do
  rm -rf "$shm" "$shm.f32" "$shm.st"
  carried=$("$bin" convert "$work/$s" -o "$shm" --threads 2 --quantize int8 --lossless --json | sqnr)
  rm -rf "$shm"
  "$bin" convert "$work/$s" -o "$shm.f32" --threads 2 --dtype f32 --compression none --quiet
  mkdir -p "$shm.st"
  "$bin" export "$shm.f32" "$shm.st/model.safetensors" >/dev/null
  cp "$work/$s/config.json" "$shm.st/config.json"
  "$py" -c 'import json,sys; p=sys.argv[1]; c=json.load(open(p)); c.pop("quantization_config", None); json.dump(c, open(p, "w"))' "$shm.st/config.json"
  rm -rf "$shm.f32"
  again=$("$bin" convert "$shm.st" -o "$shm" --threads 2 --quantize int8 --json \
    --quantize-skip model.embed_tokens.weight --quantize-skip lm_head.weight | sqnr)
  rm -rf "$shm" "$shm.st"
  printf '%-6s %22s %26s\n' "$s" "$carried" "$again"
done
