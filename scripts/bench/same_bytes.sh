#!/usr/bin/env bash
# Same input and options, same bytes: converts every fixture under tests/fixtures (the
# pre-quantized ones included) with two builds of modelconv, BEFORE and AFTER, under
# SOURCE_DATE_EPOCH, into the same output path, and prints the sha256 of
# `weights.parquet` (of every part, for a parted output) and `metadata.json` for each,
# with a verdict per row. The variants: f16 (the default), --quantize int8, parts
# (--max-file-size), and an s3:// output on a loopback S3-compatible server (moto, from
# the test venv; skipped without it).
#
#   scripts/bench/same_bytes.sh BEFORE_BIN AFTER_BIN [WORKDIR]
#
# Exits 1 when any row differs.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
before="$(realpath "$1")"
after="$(realpath "$2")"
work="${3:-/dev/shm/modelconv-same-bytes}"
export SOURCE_DATE_EPOCH=1700000000
rm -rf "$work" && mkdir -p "$work"
py="$root/.venv/bin/python"

# hashes DIR: sha256 of the weights (each part) and metadata.json, one line.
hashes() {
  local d="$1"
  if [ -d "$d/weights.parquet" ]; then
    (cd "$d" && sha256sum weights.parquet/part-* weights.parquet/_manifest.json metadata.json) | sha256sum | cut -c1-16
  else
    (cd "$d" && sha256sum weights.parquet metadata.json) | sha256sum | cut -c1-16
  fi
}

fail=0
row() { # row NAME A B
  local v="same"; [ "$2" = "$3" ] || { v="DIFFERENT"; fail=1; }
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$v"
}

inputs=()
for d in "$root"/tests/fixtures/*/ "$root"/tests/fixtures/prequant/*/; do
  [ -f "$d/config.json" ] || ls "$d"/*.safetensors "$d"/*.bin >/dev/null 2>&1 || continue
  inputs+=("${d%/}")
done

echo "| conversion | before | after | |"
echo "| --- | --- | --- | --- |"
for input in "${inputs[@]}"; do
  name="${input#"$root"/tests/fixtures/}"
  for variant in f16 int8 parts; do
    case "$variant" in
      f16) opts=() ;;
      int8) opts=(--quantize int8) ;;
      parts) opts=(--max-file-size 1MB) ;;
    esac
    out="$work/out"
    h=()
    for b in "$before" "$after"; do
      rm -rf "$out"
      if "$b" convert "$input" -o "$out" "${opts[@]}" --quiet >/dev/null 2>"$work/err"; then
        h+=("$(hashes "$out")")
      else
        h+=("refused:$(tail -c 60 "$work/err" | tr -d '\n' | sha256sum | cut -c1-8)")
      fi
    done
    row "$name $variant" "${h[0]}" "${h[1]}"
  done
done

# An s3:// output (one file and parts) on a loopback moto server.
if [ -x "$(dirname "$py")/moto_server" ]; then
  port=$((20000 + RANDOM % 20000))
  "$(dirname "$py")/moto_server" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
  moto=$!
  trap 'kill $moto 2>/dev/null || true' EXIT
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=test \
    AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
  for _ in $(seq 50); do curl -s "$AWS_ENDPOINT_URL" >/dev/null && break; sleep 0.2; done
  "$py" - <<PY
import boto3
boto3.client("s3", endpoint_url="$AWS_ENDPOINT_URL", region_name="us-east-1",
             aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket="same")
PY
  for input in "$root/tests/fixtures/tiny-llama-sharded-bf16" "$root/tests/fixtures/tiny-clip"; do
    for variant in one parts; do
      opts=(); [ "$variant" = parts ] && opts=(--max-file-size 1MB)
      h=()
      for b in "$before" "$after"; do
        "$b" convert "$input" -o "s3://same/out/" --force "${opts[@]}" --quiet >/dev/null
        rm -rf "$work/s3" && mkdir -p "$work/s3"
        "$py" - "$work/s3" <<PY
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url="$AWS_ENDPOINT_URL", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
for o in s3.list_objects_v2(Bucket="same", Prefix="out/").get("Contents", []):
    p = os.path.join(sys.argv[1], o["Key"][len("out/"):])
    os.makedirs(os.path.dirname(p), exist_ok=True)
    s3.download_file("same", o["Key"], p)
PY
        h+=("$(hashes "$work/s3")")
      done
      row "s3 ${input##*/} $variant" "${h[0]}" "${h[1]}"
    done
  done
fi
rm -rf "$work"
exit "$fail"
