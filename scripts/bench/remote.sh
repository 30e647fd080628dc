#!/usr/bin/env bash
# Remote-input bench: the ~4.4 GB f32 Llama-shaped checkpoint (22 layers, 3 shards)
# served by the Hub-like test server (tests/servers/hub_server.py, loopback, LFS files
# redirected to its storage port, bodies sent with sendfile) and converted to f16 zstd-3
# with the output on /dev/shm (removed before every run), in alternating rounds:
#
#   curl      every shard fetched through its resolve URL at once (`curl -L`, one
#             stream per shard, to /dev/null): the server's own throughput
#   local     `modelconv convert DIR`                       (the reference)
#   hub       `modelconv convert hf://bench/llama22`
#   resets    the same with the connection reset after every 256 MiB of each body
#   curl@cap, hub@cap   curl and the hub conversion with the server's link capped at
#             RATE bytes/s in all (its `rate` fault; RATE=5e8 by default): a network
#             slower than the conversion, where the fetch throughput against curl's is
#             the measure
#
# Prints the median wall time, peak RSS, CPU seconds (user + system: modelconv's, and
# the server's beside it, which shares the 2 cores) and throughput of each, and the
# ratios the issue asks for: hub/local time, hub throughput / curl throughput,
# hub/local RSS, resets/hub.
#
#   [RATE=B] scripts/bench/remote.sh [WORKDIR] [ROUNDS]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
. "$root/scripts/bench/lib.sh"
bench_init "${1:-$root/.cache/bench-remote}"
rounds="${2:-3}"
rate="${RATE:-5e8}"
model="$work/llama22"
[ -f "$model/config.json" ] || "$py" "$root/scripts/bench/make_llama.py" "$model" 22 3
bytes=$(cat "$model"/*.safetensors | wc -c)
# The server hashes every file once at start (its LFS sha256).
coproc HUB { exec "$py" "$root/tests/servers/hub_server.py" --repo "bench/llama22=$model"; }
read -r port storage <&"${HUB[0]}"
trap 'kill "$HUB_PID" 2>/dev/null || true; rm -rf /dev/shm/modelconv-remote' EXIT
ep="http://127.0.0.1:$port"
fault() { curl -s -X POST --data "$1" "$ep/_control" >/dev/null; }
shards=$(cd "$model" && ls *.safetensors)
curl_all() {
  for f in $shards; do
    curl -s -L -o /dev/null "$ep/bench/llama22/resolve/main/$f" &
  done
  wait
}
shm=/dev/shm/modelconv-remote
# The server's CPU seconds so far (utime + stime of /proc/PID/stat).
server_cpu() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / t}' "/proc/$HUB_PID/stat"; }
declare -A wall rss cpu srv
for r in $(seq 1 "$rounds"); do
  for mode in curl local hub resets curl@cap hub@cap; do
    rm -rf "$shm"
    fault '{"clear": true}'
    s0=$(server_cpu)
    case $mode in
      curl) read -r w m u y < <(secs bash -c "$(declare -f curl_all); shards='$shards' ep='$ep' curl_all") ;;
      local) read -r w m u y < <(secs "$bin" convert "$model" -o "$shm" --quiet) ;;
      hub) read -r w m u y < <(secs env HF_ENDPOINT="$ep" "$bin" convert hf://bench/llama22 -o "$shm" --quiet) ;;
      resets)
        fault '{"reset_every": 268435456}'
        read -r w m u y < <(secs env HF_ENDPOINT="$ep" "$bin" convert hf://bench/llama22 -o "$shm" --quiet)
        ;;
      curl@cap)
        fault "{\"rate\": $rate}"
        read -r w m u y < <(secs bash -c "$(declare -f curl_all); shards='$shards' ep='$ep' curl_all")
        ;;
      hub@cap)
        fault "{\"rate\": $rate}"
        read -r w m u y < <(secs env HF_ENDPOINT="$ep" "$bin" convert hf://bench/llama22 -o "$shm" --quiet)
        ;;
    esac
    s1=$(server_cpu)
    wall[$mode]="${wall[$mode]:-} $w"
    rss[$mode]="${rss[$mode]:-} $m"
    cpu[$mode]="${cpu[$mode]:-} $(awk -v u="$u" -v y="$y" 'BEGIN {print u + y}')"
    srv[$mode]="${srv[$mode]:-} $(awk -v a="$s0" -v b="$s1" 'BEGIN {print b - a}')"
  done
done
fault '{"clear": true}'
# One more hub run for the fetched bytes and requests (its --json report).
rm -rf "$shm"
report=$(HF_ENDPOINT="$ep" "$bin" convert hf://bench/llama22 -o "$shm" --json)
fetched=$(echo "$report" | "$py" -c 'import json,sys; f=json.load(sys.stdin)["fetched"]; print(f["bytes"], f["requests"])')
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-8s %9s %9s %8s %10s %10s\n' run median_s peak_MiB cpu_s server_cpu_s MB_per_s
for mode in curl local hub resets curl@cap hub@cap; do
  w=$(echo "${wall[$mode]}" | median); m=$(echo "${rss[$mode]}" | median)
  c=$(echo "${cpu[$mode]}" | median); sc=$(echo "${srv[$mode]}" | median)
  printf '%-8s %9s %9s %8s %10s %10s\n' "$mode" "$w" "$((m / 1024))" "$c" "$sc" "$(awk -v b="$bytes" -v w="$w" 'BEGIN {printf "%.0f", b / w / 1e6}')"
  key=${mode//@/_}
  eval "w_$key=$w; m_$key=$m"
done
echo "input: $bytes bytes in 3 shards; the hub run fetched $fetched (bytes, requests)"
echo "hub / local time: $(ratio "$w_hub" "$w_local") (goal <= 1.15)"
echo "hub throughput / curl throughput: $(ratio "$w_curl" "$w_hub") (goal >= 0.9)"
echo "hub / local peak RSS: $(ratio "$m_hub" "$m_local") (goal <= 1.10)"
echo "resets every 256 MiB / clean hub run: $(ratio "$w_resets" "$w_hub") (goal <= 1.3)"
echo "at a $rate B/s link: hub throughput / curl throughput: $(ratio "$w_curl_cap" "$w_hub_cap") (goal >= 0.9)"
