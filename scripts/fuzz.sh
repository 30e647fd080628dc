#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a given time each, each starting from a
# seed corpus of real inputs, then keeps what the runs found as regression inputs.
#
#   scripts/fuzz.sh [-t SECONDS] [-j PARALLEL] [--if-available] [target ...]
#
# Seed corpora (fuzz/corpus/<target>/, not committed) start from fuzz/regressions/<target>/
# plus, per target: the fixtures' safetensors files (header), converted weight files of
# several fixtures and options (weights), the fixtures' PyTorch checkpoints and their
# data.pkl files (pickle, zip), the fixtures' shard indexes (index). Crashes, timeouts
# and slow units are copied into fuzz/regressions/<target>/found-<sha1>, which
# `cargo test` replays (tests/fuzz_regressions.rs). Prints one line per target:
# seconds, executions, executions/s, corpus size, findings.
#
# Leak detection is off: LeakSanitizer reports the thread-local destructor records of
# the reader's worker threads (64 bytes from glibc's __cxa_thread_atexit_impl, kept in
# fuzz/regressions/weights/found-83eb8eb1…) as leaks. Slow units (over 5 s in the
# sanitized build) are kept like crashes.
#
# Needs cargo-fuzz. A nightly toolchain is used when rustup lists one; otherwise stable
# with RUSTC_BOOTSTRAP=1 and --sanitizer none. With --if-available and no cargo-fuzz,
# says so and exits 0 (the regression inputs still run in `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_EACH=60
PARALLEL=1
IF_AVAILABLE=0
TARGETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        -t) SECONDS_EACH=$2; shift 2 ;;
        -j) PARALLEL=$2; shift 2 ;;
        --if-available) IF_AVAILABLE=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) TARGETS+=("$1"); shift ;;
    esac
done
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=($(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^modelconv-fuzz$'))
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    if [ $IF_AVAILABLE = 1 ]; then
        echo "fuzz: cargo-fuzz is not installed; skipping the fuzz runs (cargo test replays fuzz/regressions)"
        exit 0
    fi
    echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 1
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    FUZZ=(cargo +nightly fuzz)
    SANITIZER=()
else
    export RUSTC_BOOTSTRAP=1
    FUZZ=(cargo fuzz)
    SANITIZER=(--sanitizer none)
fi

# Seed corpora.
seed() { mkdir -p "fuzz/corpus/$1"; cp -n "${@:2}" "fuzz/corpus/$1/" 2>/dev/null || true; }
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    [ -d "fuzz/regressions/$t" ] && seed "$t" fuzz/regressions/"$t"/*
done
seed header $(find tests/fixtures -name '*.safetensors' -size -300k)
seed index $(find tests/fixtures -name '*.index.json')
bins=$(find tests/fixtures -name '*.bin' -size -300k)
seed pickle $bins
seed zip $bins
if printf '%s\n' "${TARGETS[@]}" | grep -qx weights; then
    cargo build --release --quiet
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    i=0
    for args in "tests/fixtures/tiny-bert" "tests/fixtures/tiny-clip --quantize int8" \
        "tests/fixtures/tiny-whisper --dtype keep --compression none" \
        "tests/fixtures/tiny-llama-sharded-bf16 --compression lz4" \
        "tests/fixtures/tricky-storage-bin --model-type causallm --compression snappy"; do
        i=$((i + 1))
        # shellcheck disable=SC2086
        ./target/release/modelconv convert $args -o "$tmp/$i" --quiet
        cp "$tmp/$i/weights.parquet" "fuzz/corpus/weights/converted-$i.parquet"
    done
fi

run() {
    local t=$1 log="fuzz/artifacts/$1.log"
    mkdir -p "fuzz/artifacts/$t"
    local start=$(date +%s)
    # Failures are findings, collected below; the run's own status is not the verdict.
    (cd fuzz && "${FUZZ[@]}" run "${SANITIZER[@]}" --release "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=20 -rss_limit_mb=2048 \
        -report_slow_units=5 -print_final_stats=1 -detect_leaks=0) >"$log" 2>&1 || true
    local took=$(( $(date +%s) - start ))
    local runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    local found=0
    for f in fuzz/artifacts/"$t"/{crash,timeout,slow-unit,oom,leak}-*; do
        [ -e "$f" ] || continue
        local sha=$(sha1sum "$f" | cut -c1-40)
        mkdir -p "fuzz/regressions/$t"
        cp "$f" "fuzz/regressions/$t/found-$sha"
        rm "$f"
        found=$((found + 1))
    done
    printf '%-10s %5ss %12s runs %8s/s %6s corpus %3s found\n' "$t" "$took" "${runs:-?}" \
        "$(( ${runs:-0} / (took > 0 ? took : 1) ))" "$(ls "fuzz/corpus/$t" | wc -l)" "$found"
}

# Build once, then run the targets PARALLEL at a time.
(cd fuzz && "${FUZZ[@]}" build "${SANITIZER[@]}" --release) >/dev/null
printf '%-10s %6s %17s %10s %13s %9s\n' target time executions rate corpus findings
running=0
for t in "${TARGETS[@]}"; do
    run "$t" &
    running=$((running + 1))
    if [ $running -ge "$PARALLEL" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait
echo "fuzz: logs in fuzz/artifacts/<target>.log; new regression inputs: see git status fuzz/regressions"
