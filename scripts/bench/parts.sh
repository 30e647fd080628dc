#!/usr/bin/env bash
# Parts bench: the ~13.5 GB bf16 Llama-2-7B-shaped checkpoint (32 layers, 5 shards)
# converted to f16 as one file and as parts of at most PART_SIZE (default 2GB), same
# options otherwise, in alternating runs with the output on the RAM disk (removed
# before every run). Prints wall time and peak RSS of each, best and median, and their
# ratio; then a conversion killed (SIGKILL) once about 60% of its parts are in and
# resumed with --resume, the resumed run's time against the median full parted run
# (what the resume redid beyond the missing parts: at most the part in flight).
#
#   scripts/bench/parts.sh [WORKDIR] [ROUNDS] [PART_SIZE]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-$root/.cache/bench-parts}"
rounds="${2:-3}"
size="${3:-2GB}"
model="$work/llama7b"
[ -f "$model/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$model" 32 5 --7b --bf16
shm=/dev/shm/modelconv-parts
declare -A wall rss
for r in $(seq 1 "$rounds"); do
  for mode in one parts; do
    rm -rf "$shm"
    extra=()
    [ "$mode" = parts ] && extra=(--max-file-size "$size")
    read -r w m _ < <(secs "$bin" convert "$model" -o "$shm" --quiet "${extra[@]}")
    wall[$mode]="${wall[$mode]:-} $w"
    rss[$mode]="${rss[$mode]:-} $m"
  done
done
stat() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {printf "%s %s\n", a[1], a[int((NR+1)/2)]}'; }
read -r ob om < <(echo "${wall[one]}" | stat)
read -r pb pm < <(echo "${wall[parts]}" | stat)
read -r orss _ < <(echo "${rss[one]}" | stat)
read -r prss _ < <(echo "${rss[parts]}" | stat)
printf '%-16s %8s %9s %9s\n' output best_s median_s peak_MiB
printf '%-16s %8s %9s %9s\n' "one file" "$ob" "$om" "$((orss / 1024))"
printf '%-16s %8s %9s %9s\n' "parts of $size" "$pb" "$pm" "$((prss / 1024))"
echo "parts / one file: time $(ratio "$pm" "$om") (median), $(ratio "$pb" "$ob") (best); peak RSS $(ratio "$prss" "$orss")"
ls -l "$shm/weights.parquet" | sed 's/^/  /'
count=$(ls "$shm/weights.parquet" | grep -c '^part-')
# Kill once 60% of the parts are complete, then resume.
rm -rf "$shm"
"$bin" convert "$model" -o "$shm" --quiet --max-file-size "$size" &
pid=$!
want=$(( (count * 6 + 9) / 10 ))
while [ "$(ls "$shm/weights.parquet" 2>/dev/null | grep -c '^part-' || true)" -lt "$want" ]; do sleep 0.05; done
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
kept=$(ls "$shm/weights.parquet" | grep -c '^part-' || true)
read -r rw _ _ < <(secs "$bin" convert "$model" -o "$shm" --quiet --max-file-size "$size" --resume)
echo "killed with $kept of $count parts complete; resume: $rw s against $pm s for a full parted run ($(ratio "$rw" "$pm")); the missing parts are $(ratio "$((count - kept))" "$count") of the parts"
rm -rf "$shm"
