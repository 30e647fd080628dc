#!/usr/bin/env bash
# Dequantization bench: the bench's 1.1B Llama layout (22 layers, 3 shards) as FP8
# block-scaled, GPTQ 4-bit (plain and desc_act), MXFP4, AWQ 4-bit, compressed-tensors int4 (Kimi-K2's
# W4A16 layout), ModelOpt NVFP4 and compressed-tensors MXFP4 checkpoints, each converted to f16 against the same
# layout in bf16 -> f16 (the same output size), in alternating runs with the output on
# the RAM disk (removed before every run). Prints wall time and peak RSS per scheme,
# best and median, the median user CPU time (the conversion's own work: the system
# time of writing the RAM disk is the same for every scheme and is where this
# machine's run-to-run noise is), and the ratios to the bf16 run, with zstd (the default) and with
# `--compression none` (the pipeline without the compressor: dequantized 4-bit values
# are 16 levels per group, which zstd works harder on than bf16-derived values), and
# the compressed output sizes; then `zstd -T2 -3` over each scheme's own f16 bytes
# (the uncompressed output exported to safetensors), the compression limit of that data.
#
#   scripts/bench/prequant.sh [WORKDIR] [ROUNDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-$root/.cache/bench-prequant}"
rounds="${2:-5}"
schemes=(bf16 fp8 gptq gptq-act mxfp4 awq ct nvfp4 ct-mxfp4)
for s in "${schemes[@]}"; do
  [ -f "$work/$s/config.json" ] || "$py" "$root/scripts/bench/make_prequant.py" "$work/$s" 22 3 "$s"
done
shm=/dev/shm/modelconv-prequant
declare -A wall rss user size
for r in $(seq 1 "$rounds"); do
  # Read the inputs into the page cache, then alternate the schemes.
  cat "$work"/*/*.safetensors >/dev/null
  for s in "${schemes[@]}"; do
    for c in zstd none; do
      rm -rf "$shm"
      read -r w m u _ < <(secs "$bin" convert "$work/$s" -o "$shm" --threads 2 --compression "$c" --quiet)
      wall[$s-$c]="${wall[$s-$c]:-} $w"
      user[$s-$c]="${user[$s-$c]:-} $u"
      rss[$s-$c]="${rss[$s-$c]:-} $m"
      size[$s-$c]=$(stat -c %s "$shm/weights.parquet")
    done
  done
done
rm -rf "$shm"
stat() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {printf "%s %s\n", a[1], a[int((NR+1)/2)]}'; }
printf '%-13s %8s %9s %7s %7s %7s %9s %7s %10s\n' scheme best_s median_s ratio user_s ratio peak_MiB ratio out_MB
for c in zstd none; do
  read -r bb bm < <(echo "${wall[bf16-$c]}" | stat)
  read -r rb _ < <(echo "${rss[bf16-$c]}" | stat)
  read -r _ ub < <(echo "${user[bf16-$c]}" | stat)
  for s in "${schemes[@]}"; do
    read -r b m < <(echo "${wall[$s-$c]}" | stat)
    read -r _ um < <(echo "${user[$s-$c]}" | stat)
    read -r rm_ _ < <(echo "${rss[$s-$c]}" | stat)
    printf '%-13s %8s %9s %7s %7s %7s %9s %7s %10s\n' "$s $c" "$b" "$m" "$(ratio "$m" "$bm")" "$um" "$(ratio "$um" "$ub")" \
      "$((rm_ / 1024))" "$(ratio "$rm_" "$rb")" "$((${size[$s-$c]} / 1000000))"
  done
done
# The compression limit of each scheme's output: zstd over the same f16 bytes.
printf '\n%-7s %14s %14s %10s\n' scheme zstd_T2_3_s modelconv_s ratio
for s in "${schemes[@]}"; do
  rm -rf "$shm" "$shm.st"
  "$bin" convert "$work/$s" -o "$shm" --threads 2 --compression none --quiet
  "$bin" export "$shm" "$shm.st" >/dev/null
  rm -rf "$shm"
  z=""
  for r in 1 2 3; do read -r w _ < <(secs zstd -T2 -3 -q -c "$shm.st"); z="$z $w"; done
  rm -f "$shm.st"
  read -r zb _ < <(echo "$z" | stat)
  read -r mb _ < <(echo "${wall[$s-zstd]}" | stat)
  printf '%-7s %14s %14s %10s\n' "$s" "$zb" "$mb" "$(ratio "$mb" "$zb")"
done
du -sh "$work"/* | sed 's/^/input  /'
