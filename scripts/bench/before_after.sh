#!/usr/bin/env bash
# Two builds of modelconv side by side on the benches' main conversions, in alternating
# rounds (the order of the two builds swapped every round), output on /dev/shm (removed
# before every run):
#
#   e2e     the ~4.4 GB f32 Llama-shaped checkpoint (22 layers, 3 shards) -> f16 zstd-3
#   parts   the ~13.5 GB bf16 Llama-2-7B-shaped checkpoint (32 layers, 5 shards) ->
#           f16, parts of at most 2GB
#   hub     the 4.4 GB checkpoint as hf://bench/llama22 from the Hub-like test server
#           (tests/servers/hub_server.py, loopback)
#
# Prints, per conversion, each build's median wall time, peak RSS and CPU seconds, and
# AFTER / BEFORE for each. Writes nothing else.
#
#   scripts/bench/before_after.sh BEFORE_BIN AFTER_BIN [WORKDIR] [ROUNDS=3]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
before="$(realpath "$1")"
after="$(realpath "$2")"
work="${3:-$root/.cache/bench-e2e}"
rounds="${4:-3}"
mkdir -p "$work"
py="$root/.venv/bin/python"
[ -f "$work/llama22/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama22" 22 3
[ -f "$work/llama7b/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$work/llama7b" 32 5 --7b --bf16
coproc HUB { exec "$py" "$root/tests/servers/hub_server.py" --repo "bench/llama22=$work/llama22"; }
read -r port _ <&"${HUB[0]}"
shm=/dev/shm/modelconv-before-after
trap 'kill "$HUB_PID" 2>/dev/null || true; rm -rf "$shm"' EXIT
ep="http://127.0.0.1:$port"
sync; echo 1 2>/dev/null >/proc/sys/vm/drop_caches || true

run() { # run BIN MODE -> "wall rss cpu"
  local b="$1" mode="$2" w m u y
  rm -rf "$shm"
  case "$mode" in
    e2e) read -r w m u y < <(secs "$b" convert "$work/llama22" -o "$shm" --quiet) ;;
    parts) read -r w m u y < <(secs "$b" convert "$work/llama7b" -o "$shm" --quiet --max-file-size 2GB) ;;
    hub) read -r w m u y < <(secs env HF_ENDPOINT="$ep" "$b" convert hf://bench/llama22 -o "$shm" --quiet) ;;
  esac
  echo "$w $m $(awk -v u="$u" -v y="$y" 'BEGIN {print u + y}')"
}

declare -A wall rss cpu
for r in $(seq 1 "$rounds"); do
  for mode in e2e parts hub; do
    if [ $((r % 2)) -eq 1 ]; then order="before after"; else order="after before"; fi
    for side in $order; do
      b=$before; [ "$side" = after ] && b=$after
      read -r w m c < <(run "$b" "$mode")
      wall[$mode.$side]="${wall[$mode.$side]:-} $w"
      rss[$mode.$side]="${rss[$mode.$side]:-} $m"
      cpu[$mode.$side]="${cpu[$mode.$side]:-} $c"
    done
  done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| conversion | before: s, MiB, CPU s | after: s, MiB, CPU s | after / before: time, RSS, CPU |"
echo "| --- | --- | --- | --- |"
for mode in e2e parts hub; do
  bw=$(echo "${wall[$mode.before]}" | median); aw=$(echo "${wall[$mode.after]}" | median)
  bm=$(echo "${rss[$mode.before]}" | median); am=$(echo "${rss[$mode.after]}" | median)
  bc=$(echo "${cpu[$mode.before]}" | median); ac=$(echo "${cpu[$mode.after]}" | median)
  echo "| $mode | $bw, $((bm / 1024)), $bc | $aw, $((am / 1024)), $ac | $(ratio "$aw" "$bw"), $(ratio "$am" "$bm"), $(ratio "$ac" "$bc") |"
done
echo "($rounds rounds, medians; the builds alternate first and second)"
