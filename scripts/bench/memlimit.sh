#!/usr/bin/env bash
# Converts a checkpoint inside a real memory limit: a cgroup with memory.max (cgroup v2)
# or memory.limit_in_bytes (v1, what this machine has), whichever the machine allows,
# and reports whether it fit.
#
#   scripts/bench/memlimit.sh CHECKPOINT OUTPUT_DIR [LIMIT_MB=1024] [-- convert options]
#
# The limit covers everything the kernel charges to the group: the process's memory
# and the page cache of the files it reads and writes (reclaimable), so OUTPUT_DIR must
# be on a real disk: tmpfs pages are charged and never reclaimed. Prints the limit,
# the group's peak charge, the failure count (allocations the limit pushed back into
# reclaim), OOM kills, the process's peak RSS, wall time, and the exit status.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { sed -n '2,12p' "$0"; exit 2; }
input=$1 out=$2
shift 2
limit_mb=1024
if [ $# -gt 0 ] && [ "$1" != "--" ]; then limit_mb=$1; shift; fi
[ "${1:-}" = "--" ] && shift
limit=$((limit_mb << 20))
cargo build --release --quiet
bin=$PWD/target/release/modelconv

self_cg=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup)
if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    kind="cgroup v2"
    parent=/sys/fs/cgroup$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup)
    cg=$parent/modelconv-memlimit-$$
    mkdir "$cg"
    echo "$limit" >"$cg/memory.max"
    echo 0 >"$cg/memory.swap.max" 2>/dev/null || true
    peak_file=$cg/memory.peak fail_file=$cg/memory.events
elif [ -d "/sys/fs/cgroup/memory$self_cg" ]; then
    kind="cgroup v1"
    cg=/sys/fs/cgroup/memory$self_cg/modelconv-memlimit-$$
    mkdir "$cg"
    echo "$limit" >"$cg/memory.limit_in_bytes"
    echo "$limit" >"$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
    peak_file=$cg/memory.max_usage_in_bytes fail_file=$cg/memory.failcnt
else
    echo "memlimit: no writable memory cgroup here (neither v2 nor v1)" >&2
    exit 1
fi
cleanup() { rmdir "$cg" 2>/dev/null || true; }
trap cleanup EXIT

rm -rf "$out"
status=0
start=$(date +%s.%N)
# The subshell moves itself into the group, then becomes the conversion.
( echo $BASHPID >"$cg/cgroup.procs"
  exec /usr/bin/time -f "%M" -o "$out.rss" "$bin" convert "$input" -o "$out" -q "$@" ) || status=$?
end=$(date +%s.%N)
peak=$(cat "$peak_file" 2>/dev/null || echo 0)
if [ "$kind" = "cgroup v2" ]; then
    fails=$(awk '$1 == "max" {print $2}' "$fail_file")
    ooms=$(awk '$1 == "oom_kill" {print $2}' "$fail_file")
else
    fails=$(cat "$fail_file")
    ooms=$(awk '$1 == "oom_kill" {print $2}' "$cg/memory.oom_control" 2>/dev/null || echo "?")
fi
rss_kb=$(tail -1 "$out.rss" 2>/dev/null || echo 0)
rm -f "$out.rss"
in_bytes=$(du -sb --apparent-size "$input" | cut -f1)
printf 'memlimit: %s, limit %d MiB, input %.1f GB\n' "$kind" "$limit_mb" "$(echo "$in_bytes / 1000000000" | bc -l)"
printf 'memlimit: exit %d in %.1f s; group peak %d MiB (page cache included), limit hits %s, OOM kills %s; process peak RSS %d MiB\n' \
    "$status" "$(echo "$end - $start" | bc -l)" "$((peak >> 20))" "$fails" "$ooms" "$((rss_kb >> 10))"
[ $status -eq 0 ] && "$bin" verify "$out" | tail -1
exit $status
