# Shared by the bench scripts (sourced after setting $root): setup, timing and ratios.

# bench_init [WORKDIR]: sets $work (default .cache/bench-e2e), $py (the test venv's
# Python, with numpy) and $bin (the release binary, built now).
bench_init() {
  work="${1:-$root/.cache/bench-e2e}"
  mkdir -p "$work"
  "$root/scripts/setup-test-env.sh" >/dev/null
  py="$root/.venv/bin/python"
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
  bin="$root/target/release/modelconv"
}

# secs CMD...: wall seconds, peak RSS (KiB), user and system CPU seconds of a command,
# as "S R U Y".
secs() {
  local log; log="$(mktemp)"
  /usr/bin/time -v "$@" >/dev/null 2>"$log" || { cat "$log"; exit 1; }
  local wall rss user sys
  wall="$(grep 'Elapsed (wall clock)' "$log" | awk '{print $NF}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')"
  rss="$(grep 'Maximum resident set size' "$log" | awk '{print $NF}')"
  user="$(grep 'User time (seconds)' "$log" | awk '{print $NF}')"
  sys="$(grep 'System time (seconds)' "$log" | awk '{print $NF}')"
  rm -f "$log"
  echo "$wall $rss $user $sys"
}
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b ? a : b) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
