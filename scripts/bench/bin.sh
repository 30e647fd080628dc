#!/usr/bin/env bash
# PyTorch .bin input against safetensors input of the same weights, and --io read
# against mmap, in one script on the same machine:
#   the ~4.4 GB f32 Llama-shaped checkpoint (22 layers, 3 shards) written twice by
#   make_llama.py from the same random stream: safetensors, and torch's zip layout;
#   each converted to f16 zstd-3 (output on /dev/shm, so the disk does not hide the
#   pipeline), interleaved, best of two; peak RSS from /usr/bin/time -v; the .bin
#   output verified value by value against the safetensors source.
# usage: scripts/bench/bin.sh [WORKDIR]   (needs ~9 GB of disk and ~2.5 GB of /dev/shm)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-}"
out="/dev/shm/modelconv-bench-bin"
[ -f "$work/llama22/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama22" 22 3 --f16-raw "$work/llama22.f16"
[ -f "$work/llama22-bin/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama22-bin" 22 3 --bin

cat "$work"/llama22/*.safetensors "$work"/llama22-bin/*.bin >/dev/null

st=(); bn=(); rd=(); rss_st=0; rss_bin=0; rss_read=0
for round in 1 2; do
  rm -rf "$out"; read -r t r < <(secs "$bin" convert "$work/llama22" -o "$out" --quiet); st+=("$t"); rss_st=$r
  rm -rf "$out"; read -r t r < <(secs "$bin" convert "$work/llama22-bin" -o "$out" --quiet); bn+=("$t"); rss_bin=$r
  [ "$round" = 2 ] && "$bin" verify "$out" --source "$work/llama22" --quiet && echo "verify: the .bin conversion equals the cast of the safetensors source, value for value"
  rm -rf "$out"; read -r t r < <(secs "$bin" convert "$work/llama22" -o "$out" --quiet --io read); rd+=("$t"); rss_read=$r
done
rm -rf "$out"
t_st="$(best "${st[@]}")"; t_bin="$(best "${bn[@]}")"; t_rd="$(best "${rd[@]}")"
echo "safetensors (mmap)   ${t_st}s   peak RSS $((rss_st / 1024)) MiB"
echo ".bin zip (mmap)      ${t_bin}s   peak RSS $((rss_bin / 1024)) MiB   ratio $(ratio "$t_bin" "$t_st") (goal <= 1.10)"
echo "safetensors --io read ${t_rd}s  peak RSS $((rss_read / 1024)) MiB   ratio $(ratio "$t_rd" "$t_st") (goal <= 1.10)"
