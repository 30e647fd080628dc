#!/usr/bin/env bash
# End-to-end performance against references run in the same script, on the same files:
#   1. ~4.4 GB f32 Llama-shaped checkpoint (3 shards) -> f16 zstd-3, vs `zstd -T<cores> -3`
#      over the same f16 bytes (goal: <= 1.15x);
#   2. the same with --compression none, vs `cp` of the input shards (goal: <= 1.5x);
#   3. peak RSS (/usr/bin/time -v) of a 6-layer and the 22-layer checkpoint (goal: flat).
# Absolute times drift on shared machines: read the ratios. Needs ~20 GB of disk.
# usage: scripts/bench/e2e.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-}"
cores="$(nproc)"

[ -f "$work/llama22/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama22" 22 3 --f16-raw "$work/llama22.f16"
[ -f "$work/llama6/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama6" 6 3

warm() { cat "$@" >/dev/null; }

shards=("$work"/llama22/model-*.safetensors)
warm "${shards[@]}" "$work/llama22.f16"

# Interleaved, twice each; the best of each side is compared. modelconv fsyncs its
# output before renaming it into place (no half-written file, ever); the references are
# timed both as they are and followed by `sync`, the like-for-like comparison.
# Previous outputs are removed (and synced) before each timed run.
zs=(); zss=(); cs=(); ns=(); cps=(); cpss=(); rss22=0
clean() { rm -rf "$work/out-zstd" "$work/out-none" "$work/cp" "$work/ref.zst"; sync; }
for round in 1 2; do
  clean; read -r t _ < <(secs zstd -q -f -T"$cores" -3 "$work/llama22.f16" -o "$work/ref.zst"); zs+=("$t")
  clean; read -r t _ < <(secs sh -c "zstd -q -f -T$cores -3 '$work/llama22.f16' -o '$work/ref.zst' && sync"); zss+=("$t")
  clean; read -r t r < <(secs "$bin" convert "$work/llama22" -o "$work/out-zstd" --quiet); cs+=("$t"); rss22=$r
  [ "$round" = 2 ] && "$bin" verify "$work/out-zstd" --quiet && echo "verify: ok (checksums of the zstd output)"
  clean; mkdir -p "$work/cp"; read -r t _ < <(secs cp "${shards[@]}" "$work/cp/"); cps+=("$t")
  clean; mkdir -p "$work/cp"; read -r t _ < <(secs sh -c "cp ${shards[*]} '$work/cp/' && sync"); cpss+=("$t")
  clean; read -r t _ < <(secs "$bin" convert "$work/llama22" -o "$work/out-none" --quiet --compression none); ns+=("$t")
done
rm -rf "$work/out-none" "$work/cp"
warm "$work"/llama6/model-*.safetensors
read -r _ rss6 < <(secs "$bin" convert "$work/llama6" -o "$work/out6" --force --quiet)

z="$(best "${zs[0]}" "${zs[1]}")"; c="$(best "${cps[0]}" "${cps[1]}")"
zsy="$(best "${zss[0]}" "${zss[1]}")"; csy="$(best "${cpss[0]}" "${cpss[1]}")"
t_conv="$(best "${cs[0]}" "${cs[1]}")"; t_none="$(best "${ns[0]}" "${ns[1]}")"
src_gb="$(du -cb "${shards[@]}" | tail -1 | awk '{printf "%.2f", $1/1e9}')"
echo "input: $src_gb GB f32, 3 shards, $cores cores"
echo "convert f16 zstd-3   ${t_conv}s   vs zstd -T$cores -3 on the f16 bytes ${z}s (+sync ${zsy}s)   ratio $(ratio "$t_conv" "$z") ($(ratio "$t_conv" "$zsy") vs +sync; goal <= 1.15)"
echo "convert f16 none     ${t_none}s   vs cp of the shards ${c}s (+sync ${csy}s)   ratio $(ratio "$t_none" "$c") ($(ratio "$t_none" "$csy") vs +sync; goal <= 1.5)"
echo "peak RSS: 6 layers $((rss6 / 1024)) MiB, 22 layers $((rss22 / 1024)) MiB (goal: flat)"
rm -rf "$work/out-zstd" "$work/out6" "$work/ref.zst"
